//! `embeddinggemma_trigger()`: keeps a vector column in step with a text column, row by row,
//! before the row is stored.

use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::embedding;
use crate::pg::columns::{check_columns, source_text};
use crate::pg::errors::raise;
use crate::pg::vector::{PgHalfvec, PgVector};
use crate::pg::{catalog, quote};

const USAGE: &str = "CREATE TRIGGER … BEFORE INSERT OR UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger('body', 'v' [, task [, dim]]);";

#[pg_trigger(sql = "")]
fn embeddinggemma_trigger<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::PgTriggerError> {
    let misuse = |what: &str| -> ! {
        raise(PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION, format!("embeddinggemma_trigger(): {what}"), USAGE)
    };
    let op = trigger.op()?;
    let row_level = matches!(trigger.level(), PgTriggerLevel::Row);
    let before = matches!(trigger.when()?, PgTriggerWhen::Before);
    if !row_level || !before || !matches!(op, PgTriggerOperation::Insert | PgTriggerOperation::Update) {
        misuse("must be fired BEFORE INSERT OR UPDATE … FOR EACH ROW")
    }
    let args = trigger.extra_args()?;
    if !(2..=4).contains(&args.len()) {
        misuse("takes a source column, a target column, and optionally a task and a dimension")
    }
    let (source, target) = (&args[0], &args[1]);
    let task = args.get(2).map_or("document", String::as_str);
    let dim = match args.get(3).map(|d| d.trim().parse::<i32>()) {
        None => 768,
        Some(Ok(d)) => d,
        Some(Err(_)) => misuse(&format!("dim {:?} is not a number", args[3])),
    };
    let relation = trigger.relation()?;
    let checked = check_columns(&relation, source, target, dim);
    let column = checked.source;
    // A generated column is computed after BEFORE triggers: NEW does not hold its text yet.
    if relation.tuple_desc().get(column.attno.get() - 1).is_some_and(|a| a.attgenerated != 0) {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("embeddinggemma_trigger(): source column \"{source}\" is generated, computed after BEFORE triggers run"),
            "Embed it with an AFTER trigger, which sees the row as stored: embeddinggemma_statement_trigger, or an asynchronous target (embeddinggemma_async).",
        )
    }

    let data = trigger.trigger_data();
    let events = if matches!(op, PgTriggerOperation::Update) {
        pg_sys::TRIGGER_TYPE_UPDATE
    } else {
        pg_sys::TRIGGER_TYPE_INSERT
    };
    // SAFETY: the relation and trigger PostgreSQL fires.
    let later =
        unsafe { crate::write::trigger_order::later_before_triggers(data.tg_relation, data.tg_trigger, events) };
    if let (Some(first), Some(last)) = (later.first(), later.last()) {
        let ours = trigger.name()?;
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("embeddinggemma_trigger(): BEFORE trigger \"{first}\" fires after \"{ours}\" and may change the text it embedded"),
            format!(
                "Triggers fire in name order: rename the embedding trigger to fire last (ALTER TRIGGER {} ON {} RENAME TO {}), or embed from an AFTER trigger: embeddinggemma_statement_trigger, or an asynchronous target.",
                quote::ident(ours),
                catalog::display(relation.oid()),
                quote::ident(&format!("{last}_{ours}"))
            ),
        )
    }
    let update = matches!(op, PgTriggerOperation::Update);
    // SAFETY: PostgreSQL hands a row trigger valid tuples of tg_relation (tg_newtuple only on
    // UPDATE), and `column` was checked against that relation above.
    let (text, old_text) = unsafe {
        let desc = (*data.tg_relation).rd_att;
        let new = if update { data.tg_newtuple } else { data.tg_trigtuple };
        (source_text(new, desc, &column), update.then(|| source_text(data.tg_trigtuple, desc, &column)))
    };
    let mut row = trigger.new().expect("INSERT and UPDATE row triggers have NEW").into_owned();
    if old_text.is_some_and(|old| old == text) {
        return Ok(Some(row));
    }
    let values = text.map(|t| embedding::embed(&[&t], task, dim).swap_remove(0));
    let set = if checked.target_type == crate::pg::vector::halfvec_type_oid() {
        row.set_by_name(target, values.map(|v| PgHalfvec::from_slice(&v)))
    } else {
        row.set_by_name(target, values.map(|v| PgVector::from_slice(&v)))
    };
    set.unwrap_or_else(|e| misuse(&e.to_string()));
    Ok(Some(row))
}
