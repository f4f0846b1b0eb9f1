//! The synchronous triggers through DDL (issue 27): they name their columns and chunk table in
//! their arguments, which the extension rewrites when those are renamed, so writes keep
//! working with the right vectors and chunks; a retyped source gets a WARNING; a generated
//! source is refused by the row trigger (it cannot see the text in time).

use embeddinggemma_sql_tests::*;
use postgres::Client;

fn wrong(c: &mut Client, table: &str, text: &str, vector: &str) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {table} WHERE {vector} IS NULL OR {vector} <=> embed({text}) > 1e-6"),
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn renamed_columns_and_chunk_tables_keep_the_sync_triggers_working() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP TABLE IF EXISTS sr_docs, sr_chunks, sr_pieces;
         CREATE TABLE sr_docs (id int PRIMARY KEY, body text, v vector(768), w vector(768));
         CREATE TABLE sr_chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768),
                                 PRIMARY KEY (doc_id, chunk));
         CREATE TRIGGER sr_row BEFORE INSERT OR UPDATE ON sr_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         CREATE TRIGGER sr_statement AFTER INSERT ON sr_docs REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'w');
         CREATE TRIGGER sr_statement_update AFTER UPDATE ON sr_docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
             FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'w');
         CREATE TRIGGER sr_chunk AFTER INSERT OR UPDATE OR DELETE ON sr_docs FOR EACH ROW
             EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'sr_chunks', 'doc_id');
         INSERT INTO sr_docs (id, body) VALUES (1, 'written before the renames');",
    )
    .unwrap();
    c.batch_execute(
        "ALTER TABLE sr_docs RENAME COLUMN body TO content;
         ALTER TABLE sr_docs RENAME COLUMN v TO row_vector;
         ALTER TABLE sr_docs RENAME COLUMN w TO statement_vector;
         ALTER TABLE sr_docs RENAME COLUMN id TO doc;
         ALTER TABLE sr_chunks RENAME TO sr_pieces;
         ALTER TABLE sr_pieces RENAME COLUMN doc_id TO document;",
    )
    .unwrap();
    c.batch_execute(
        "INSERT INTO sr_docs (doc, content) VALUES (2, 'written after the renames');
         UPDATE sr_docs SET content = 'changed after the renames' WHERE doc = 1;",
    )
    .unwrap();
    assert_eq!(wrong(&mut c, "sr_docs", "content", "row_vector"), 0, "the row trigger did not follow the renames");
    assert_eq!(
        wrong(&mut c, "sr_docs", "content", "statement_vector"),
        0,
        "the statement trigger did not follow the renames"
    );
    let pieces: i64 = c
        .query_one("SELECT count(*) FROM sr_pieces p JOIN sr_docs d ON d.doc = p.document WHERE p.body = d.content AND p.embedding <=> embed(p.body) < 1e-6", &[])
        .unwrap()
        .get(0);
    assert_eq!(pieces, 2, "the chunk trigger did not follow the renames");
    let said = notices.lock().unwrap().clone();
    assert!(said.iter().filter(|n| n.contains("now calls")).count() >= 4, "{said:?}");
    c.batch_execute("DROP TABLE sr_docs, sr_pieces").unwrap();
}

/// A rename by one role does not rewrite a trigger on another role's table (that would act
/// with its owner's rights): a WARNING says what breaks, with the call that mends it.
#[test]
fn a_rename_leaves_other_roles_triggers_alone_with_a_warning() {
    let mut admin = connect();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS so_docs, so_chunks;
             DROP ROLE IF EXISTS so_other;
             DROP ROLE IF EXISTS so_renamer;
             CREATE ROLE so_other;
             CREATE ROLE so_renamer;
             CREATE TABLE so_chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768),
                                     PRIMARY KEY (doc_id, chunk));
             CREATE TABLE so_docs (id int PRIMARY KEY, body text);
             CREATE TRIGGER so_chunk AFTER INSERT OR UPDATE OR DELETE ON so_docs FOR EACH ROW
                 EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'so_chunks', 'doc_id');
             ALTER TABLE so_docs OWNER TO so_other;
             ALTER TABLE so_chunks OWNER TO so_renamer;",
        )
        .unwrap();
    // so_renamer owns the chunk table, not the documents (whose trigger names its column).
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute("SET ROLE so_renamer; ALTER TABLE so_chunks RENAME COLUMN doc_id TO document; RESET ROLE").unwrap();
    let said = notices.lock().unwrap().clone();
    assert!(said.iter().any(|n| n.contains("owned by another role")), "{said:?}");
    let args: String = admin
        .query_one("SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE tgname = 'so_chunk'", &[])
        .unwrap()
        .get(0);
    assert!(args.contains("doc_id"), "another role's trigger was rewritten: {args}");
    admin.batch_execute("DROP TABLE so_docs, so_chunks; DROP ROLE so_other; DROP ROLE so_renamer").unwrap();
}

#[test]
fn retyping_a_sync_source_warns_that_vectors_may_be_stale() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP TABLE IF EXISTS st_docs;
         CREATE TABLE st_docs (id int PRIMARY KEY, body varchar(50), v vector(768));
         CREATE TRIGGER st_row BEFORE INSERT OR UPDATE ON st_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         INSERT INTO st_docs VALUES (1, 'quiet words');
         ALTER TABLE st_docs ALTER COLUMN body TYPE text USING upper(body);",
    )
    .unwrap();
    let said = notices.lock().unwrap().clone();
    assert!(said.iter().any(|n| n.contains("retyped") && n.contains("st_docs")), "{said:?}");
    c.batch_execute("DROP TABLE st_docs").unwrap();
}

#[test]
fn dropping_a_column_a_sync_trigger_names_warns() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP TABLE IF EXISTS sd_docs;
         CREATE TABLE sd_docs (id int PRIMARY KEY, body text, v vector(768));
         CREATE TRIGGER sd_row BEFORE INSERT OR UPDATE ON sd_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         ALTER TABLE sd_docs DROP COLUMN v;",
    )
    .unwrap();
    let said = notices.lock().unwrap().clone();
    assert!(said.iter().any(|n| n.contains("sd_row") && n.contains("dropped column")), "{said:?}");
    let (_, message, _) = expect_error(&mut c, "INSERT INTO sd_docs VALUES (1, 'a row')");
    assert!(message.contains("\"v\""), "{message}");
    c.batch_execute("DROP TABLE sd_docs").unwrap();
}

#[test]
fn the_row_trigger_refuses_a_generated_source() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sg_docs;
         CREATE TABLE sg_docs (id int PRIMARY KEY, title text, body text GENERATED ALWAYS AS ('about ' || title) STORED, v vector(768));
         CREATE TRIGGER sg_row BEFORE INSERT OR UPDATE ON sg_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');",
    )
    .unwrap();
    let (code, message, hint) = expect_error(&mut c, "INSERT INTO sg_docs (id, title) VALUES (1, 'whales')");
    assert_eq!(code, "0A000", "{message}");
    assert!(hint.is_some_and(|h| h.contains("statement_trigger")), "{message}");
    c.batch_execute("DROP TABLE sg_docs").unwrap();
}

/// A BEFORE trigger that fires after the row trigger (triggers fire in name order) may change
/// the text it embedded: the write is refused with a HINT to rename, not given a stale vector.
/// Another target of the same text (the extension's own trigger) does not count.
#[test]
fn the_row_trigger_refuses_to_fire_before_a_trigger_that_may_change_the_text() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sz_docs;
         CREATE TABLE sz_docs (id int PRIMARY KEY, title text, body text, v vector(768), w vector(256));
         CREATE OR REPLACE FUNCTION sz_compose() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN NEW.body := 'about ' || NEW.title; RETURN NEW; END $$;
         CREATE TRIGGER embed_v BEFORE INSERT OR UPDATE ON sz_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         CREATE TRIGGER embed_w BEFORE INSERT OR UPDATE ON sz_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'w', 'document', '256');
         INSERT INTO sz_docs (id, title, body) VALUES (1, 'whales', 'two targets of one text');",
    )
    .unwrap();
    let ok: bool = c
        .query_one("SELECT v <=> embed(body) < 1e-6 AND w <=> embed(body, 'document', 256) < 1e-6 FROM sz_docs", &[])
        .unwrap()
        .get(0);
    assert!(ok, "two row triggers of one text");
    c.batch_execute(
        "CREATE TRIGGER set_body BEFORE INSERT OR UPDATE ON sz_docs FOR EACH ROW EXECUTE FUNCTION sz_compose()",
    )
    .unwrap();
    let (code, message, hint) = expect_error(&mut c, "INSERT INTO sz_docs (id, title) VALUES (2, 'volcanoes')");
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("set_body"), "{message}");
    assert!(hint.as_deref().is_some_and(|h| h.contains("RENAME TO")), "{hint:?}");
    c.batch_execute(
        "ALTER TRIGGER embed_v ON sz_docs RENAME TO zz_embed_v;
         ALTER TRIGGER embed_w ON sz_docs RENAME TO zz_embed_w;
         INSERT INTO sz_docs (id, title) VALUES (2, 'volcanoes');
         UPDATE sz_docs SET title = 'deserts' WHERE id = 1;",
    )
    .unwrap();
    assert_eq!(wrong(&mut c, "sz_docs", "body", "v"), 0, "the text as stored was not embedded");
    c.batch_execute("DROP TABLE sz_docs; DROP FUNCTION sz_compose()").unwrap();
}

/// A trigger of an ordinary role whose arguments are made to look like the end of a trigger
/// definition, naming a superuser's chunk table: the superuser's rename rewrites it, as its
/// owner, with the arguments as data (red team: they were read as SQL and ran as the superuser).
#[test]
fn a_rename_never_runs_a_triggers_arguments_as_sql() {
    let mut admin = connect();
    admin
        .batch_execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sx_mallory') THEN CREATE ROLE sx_mallory LOGIN; END IF; END $$;
             ALTER ROLE sx_mallory NOSUPERUSER;
             DROP SCHEMA IF EXISTS sx_mal CASCADE;
             CREATE SCHEMA sx_mal AUTHORIZATION sx_mallory;
             DROP TABLE IF EXISTS sx_chunks, sx_chunks2;
             CREATE TABLE sx_chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768),
                                     PRIMARY KEY (doc_id, chunk));",
        )
        .unwrap();
    let mut mallory = connect_as("sx_mallory");
    mallory
        .batch_execute(
            "CREATE TABLE sx_mal.docs (id int PRIMARY KEY, body text);
             CREATE TRIGGER t_inj AFTER INSERT OR UPDATE OR DELETE ON sx_mal.docs FOR EACH ROW
               EXECUTE FUNCTION public.embeddinggemma_chunk_trigger(
                 '); ALTER ROLE sx_mallory SUPERUSER; --', 'id', 'public.sx_chunks', 'doc_id', 'X EXECUTE FUNCTION Y(');",
        )
        .unwrap();
    admin
        .batch_execute(
            "ALTER TABLE sx_chunks RENAME COLUMN doc_id TO document; ALTER TABLE sx_chunks RENAME TO sx_chunks2",
        )
        .unwrap();
    let superuser: bool =
        admin.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'sx_mallory'", &[]).unwrap().get(0);
    assert!(!superuser, "a trigger's arguments ran as SQL with the renaming superuser's rights");
    let args: String =
        admin.query_one("SELECT encode(tgargs, 'escape') FROM pg_trigger WHERE tgname = 't_inj'", &[]).unwrap().get(0);
    assert!(args.contains("public.sx_chunks2") && args.contains("document"), "the trigger did not follow: {args}");
    assert!(args.contains("ALTER ROLE sx_mallory SUPERUSER"), "the argument text was changed: {args}");
    admin.batch_execute("DROP SCHEMA sx_mal CASCADE; DROP TABLE sx_chunks2").unwrap();
}

/// `ALTER TABLE … SET SCHEMA` and `ALTER SCHEMA … RENAME` of a chunk table are followed: a bare
/// name would otherwise find a table another role creates in the old schema.
#[test]
fn a_chunk_table_moved_to_another_schema_is_followed() {
    let (mut c, notices) = connect_collecting_notices(&dsn());
    c.batch_execute(
        "DROP SCHEMA IF EXISTS sm_a, sm_b, sm_c CASCADE;
         CREATE SCHEMA sm_a; CREATE SCHEMA sm_b;
         CREATE TABLE sm_a.docs (id int PRIMARY KEY, body text);
         CREATE TABLE sm_a.chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768),
                                   PRIMARY KEY (doc_id, chunk));
         CREATE TRIGGER chunked AFTER INSERT OR UPDATE OR DELETE ON sm_a.docs FOR EACH ROW
           EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'chunks', 'doc_id');
         ALTER TABLE sm_a.chunks SET SCHEMA sm_b;
         CREATE TABLE sm_a.chunks (doc_id int, chunk int, start_offset int, end_offset int, body text, embedding vector(768));
         INSERT INTO sm_a.docs VALUES (1, 'a document after the move');
         ALTER SCHEMA sm_b RENAME TO sm_c;
         INSERT INTO sm_a.docs VALUES (2, 'a document after the schema rename');",
    )
    .unwrap();
    let captured: i64 = c.query_one("SELECT count(*) FROM sm_a.chunks", &[]).unwrap().get(0);
    assert_eq!(captured, 0, "chunks went to a table of the old schema");
    let followed: i64 = c.query_one("SELECT count(DISTINCT doc_id) FROM sm_c.chunks", &[]).unwrap().get(0);
    assert_eq!(followed, 2, "the moved chunk table did not get the chunks");
    assert!(
        notices.lock().unwrap().iter().filter(|n| n.contains("now calls")).count() >= 2,
        "{:?}",
        notices.lock().unwrap()
    );
    c.batch_execute("DROP SCHEMA sm_a, sm_c CASCADE").unwrap();
}

/// Triggers that cannot change the text do not make the row trigger refuse a write:
/// `suppress_redundant_updates_trigger` (PostgreSQL's docs name it to fire last), a trigger that
/// fires only on replicas, a disabled one.
#[test]
fn the_row_trigger_accepts_later_triggers_that_cannot_change_the_text() {
    let mut c = connect();
    c.batch_execute(
        "DROP TABLE IF EXISTS sq_docs;
         CREATE TABLE sq_docs (id int PRIMARY KEY, body text, v vector(768));
         CREATE OR REPLACE FUNCTION sq_shout() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN NEW.body := upper(NEW.body); RETURN NEW; END $$;
         CREATE TRIGGER embed BEFORE INSERT OR UPDATE ON sq_docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v');
         CREATE TRIGGER z_min_update BEFORE UPDATE ON sq_docs FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger();
         CREATE TRIGGER z_replica BEFORE INSERT OR UPDATE ON sq_docs FOR EACH ROW EXECUTE FUNCTION sq_shout();
         ALTER TABLE sq_docs ENABLE REPLICA TRIGGER z_replica;
         CREATE TRIGGER z_disabled BEFORE INSERT OR UPDATE ON sq_docs FOR EACH ROW EXECUTE FUNCTION sq_shout();
         ALTER TABLE sq_docs DISABLE TRIGGER z_disabled;
         INSERT INTO sq_docs (id, body) VALUES (1, 'quiet words');
         UPDATE sq_docs SET body = 'other quiet words' WHERE id = 1;",
    )
    .unwrap();
    assert_eq!(wrong(&mut c, "sq_docs", "body", "v"), 0);
    // Fires always: it may change the text.
    c.batch_execute("ALTER TABLE sq_docs ENABLE ALWAYS TRIGGER z_replica").unwrap();
    let (code, message, hint) = expect_error(&mut c, "INSERT INTO sq_docs (id, body) VALUES (2, 'loud')");
    assert_eq!(code, "0A000", "{message}");
    assert!(hint.is_some_and(|h| h.contains("z_replica_embed")), "{message}");
    c.batch_execute("DROP TABLE sq_docs; DROP FUNCTION sq_shout()").unwrap();
}
