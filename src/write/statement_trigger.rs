//! `embeddinggemma_statement_trigger()`: a bulk write embeds the new or changed texts of the
//! whole statement together (`embed_batch`'s batches), then writes the vectors back by key.

use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::embedding;
use crate::embedding::texts::{WINDOW_BYTES, WINDOW_TEXTS};
use crate::pg::columns::{check_columns, check_key};
use crate::pg::errors::raise;
use crate::pg::quote::{ident, relation};
use crate::pg::spi::text_param;
use crate::pg::vector;
use crate::write::write_back::{write_back_sql, writing, Writing};

const USAGE: &str = "CREATE TRIGGER docs_embed AFTER INSERT ON docs REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');";

#[pg_trigger(sql = "")]
fn embeddinggemma_statement_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByRust>>, pgrx::PgTriggerError> {
    let misuse = |what: &str| -> ! {
        raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            format!("embeddinggemma_statement_trigger(): {what}"),
            USAGE,
        )
    };
    let op = trigger.op()?;
    let statement = matches!(trigger.level(), PgTriggerLevel::Statement);
    let after = matches!(trigger.when()?, PgTriggerWhen::After);
    let update = matches!(op, PgTriggerOperation::Update);
    if !statement || !after || !matches!(op, PgTriggerOperation::Insert | PgTriggerOperation::Update) {
        misuse("must be fired AFTER INSERT or AFTER UPDATE … FOR EACH STATEMENT")
    }
    let args = trigger.extra_args()?;
    if !(3..=5).contains(&args.len()) {
        misuse("takes a key column, a source column, a target column, and optionally a task and a dimension")
    }
    let (key, source, target) = (&args[0], &args[1], &args[2]);
    let task = args.get(3).map_or("document", String::as_str);
    let dim = match args.get(4).map(|d| d.trim().parse::<i32>()) {
        None => 768,
        Some(Ok(d)) => d,
        Some(Err(_)) => misuse(&format!("dim {:?} is not a number", args[4])),
    };
    let Some(new_rows) = trigger.new_transition_table_name()? else {
        raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            "embeddinggemma_statement_trigger(): the trigger has no transition table of new rows",
            "Declare them: REFERENCING NEW TABLE AS new_rows (and OLD TABLE AS old_rows for UPDATE).",
        )
    };
    let old_rows = trigger.old_transition_table_name()?;
    if update && old_rows.is_none() {
        raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            "embeddinggemma_statement_trigger(): an UPDATE trigger needs the transition table of old rows too",
            "CREATE TRIGGER docs_reembed AFTER UPDATE ON docs REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION embeddinggemma_statement_trigger('id', 'body', 'v');",
        )
    }
    let rel = trigger.relation()?;
    let vector_type = check_columns(&rel, source, target, dim).target_type;
    let key_column = check_key(&rel, key);
    let relid = rel.oid();
    let table = relation(relid);
    let (new_rows, old_rows) = (ident(new_rows), old_rows.map(ident));
    let (k, s, t) = (ident(key), ident(source), ident(target));

    // A row needs a vector unless an old row had the same text and the vector it still carries:
    // rows are told apart by their text and vector, not by a key the statement may change. In
    // the extension's own writes only the text counts (they just wrote the vector).
    let unchanged = match &old_rows {
        None => String::new(),
        Some(old_rows) => {
            let same_vector = if writing(relid) {
                String::new()
            } else {
                format!(
                    " AND (o.{t}::pg_catalog.float4[] OPERATOR(pg_catalog.=) n.{t}::pg_catalog.float4[] OR (o.{t} IS NULL AND n.{t} IS NULL))"
                )
            };
            format!(" AND NOT EXISTS (SELECT FROM {old_rows} o WHERE o.{s} OPERATOR(pg_catalog.=) n.{s}{same_vector})")
        }
    };
    let changed = format!(
        "SELECT n.{k}::pg_catalog.text, n.{s}::pg_catalog.text FROM {new_rows} n WHERE n.{s} IS NOT NULL{unchanged}"
    );
    // Statements fire statement triggers even when they change no row: the writes below run
    // only when there is something to write, so the trigger does not fire itself forever.
    let text_gone = format!("n.{s} IS NULL AND n.{t} IS NOT NULL");
    let any_cleared = format!("SELECT EXISTS (SELECT FROM {new_rows} n WHERE {text_gone})");
    let cleared = format!(
        "UPDATE {table} t SET {t} = NULL FROM {new_rows} n WHERE t.{k} OPERATOR(pg_catalog.=) n.{k} AND {text_gone}"
    );
    let write = write_back_sql(&table, target, key, &key_column.sql_type());

    Spi::connect_mut(|client| {
        // SAFETY: the trigger's own TriggerData, so that its transition tables can be queried.
        unsafe { pg_sys::SPI_register_trigger_data(std::ptr::from_ref(trigger.trigger_data()).cast_mut()) };
        let _writing = Writing::start(relid);
        let clear = client.update(any_cleared.as_str(), None, &[]).and_then(|r| r.first().get_one::<bool>());
        if clear.expect("SPI reports errors as ERRORs") == Some(true) {
            client.update(cleared.as_str(), None, &[]).expect("SPI reports errors as ERRORs");
        }
        // Rows come a window at a time, so a COPY of millions holds one window's vectors.
        let mut cursor = client.open_cursor(changed.as_str(), &[]);
        loop {
            let mut keys = Vec::new();
            let mut texts = Vec::new();
            let mut bytes = 0;
            while keys.len() < WINDOW_TEXTS && bytes < WINDOW_BYTES {
                let rows = cursor.fetch(64).expect("SPI reports errors as ERRORs");
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    let key: Option<String> = row.get(1).expect("SPI reports errors as ERRORs");
                    let text: Option<String> = row.get(2).expect("SPI reports errors as ERRORs");
                    let (Some(key), Some(text)) = (key, text) else { continue };
                    bytes += text.len();
                    keys.push(key);
                    texts.push(text);
                }
            }
            if keys.is_empty() {
                break;
            }
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let vectors = embedding::embed(&refs, task, dim);
            let args = [text_param(keys), vector::array_param(&vectors, vector_type)];
            client.update(write.as_str(), None, &args).expect("SPI reports errors as ERRORs");
        }
    });
    Ok(None)
}
