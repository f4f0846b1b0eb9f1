//! The synchronous triggers (`embeddinggemma_trigger`, `_statement_trigger`, `_chunk_trigger`)
//! name their columns and chunk table in their arguments; PostgreSQL keeps trigger arguments
//! as written. A rename of such a column or table (seen by the utility hook) rewrites the
//! arguments with `CREATE OR REPLACE TRIGGER`, so the table's writes keep working instead of
//! failing on a name that is gone.

use pgrx::pg_sys;

use crate::pg::quote::literal;
use crate::pg::spi::text_param;
use crate::pg::{catalog, quote, spi};

/// One of our triggers: where it is and what it was given.
struct OurTrigger {
    oid: pg_sys::Oid,
    name: String,
    table: pg_sys::Oid,
    function: String,
    args: Vec<String>,
}

/// Argument positions naming columns of the trigger's own table, per function.
fn column_args(function: &str) -> &'static [usize] {
    match function {
        "embeddinggemma_trigger" => &[0, 1],
        "embeddinggemma_statement_trigger" => &[0, 1, 2],
        "embeddinggemma_chunk_trigger" => &[0, 1],
        _ => &[],
    }
}

/// Every trigger of this database that calls one of the extension's synchronous trigger
/// functions (not the clones PostgreSQL keeps on partitions: replacing the parent's replaces
/// them).
fn our_triggers() -> Vec<OurTrigger> {
    let Some(schema) = installed_schema() else { return Vec::new() };
    let sql = "SELECT t.oid, t.tgrelid, p.proname::pg_catalog.text, t.tgargs, t.tgname::pg_catalog.text
                 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) t.tgfoid
                WHERE p.pronamespace OPERATOR(pg_catalog.=) $1 AND NOT t.tgisinternal
                  AND t.tgconstraint OPERATOR(pg_catalog.=) 0 AND t.tgparentid OPERATOR(pg_catalog.=) 0
                  AND p.proname OPERATOR(pg_catalog.=) ANY ('{embeddinggemma_trigger,embeddinggemma_statement_trigger,embeddinggemma_chunk_trigger}')";
    pgrx::spi::Spi::connect(|c| {
        let rows = c.select(sql, None, &[text_param(schema)])?;
        rows.map(|r| {
            let bytes: Vec<u8> = r.get(4)?.unwrap_or_default();
            let mut args: Vec<String> =
                bytes.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            // tgargs ends each argument with a NUL: the split leaves one empty piece at the end.
            args.pop();
            Ok(OurTrigger {
                oid: r.get(1)?.unwrap_or_default(),
                name: r.get(5)?.unwrap_or_default(),
                table: r.get(2)?.unwrap_or_default(),
                function: r.get(3)?.unwrap_or_default(),
                args,
            })
        })
        .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .expect("SPI reports errors as ERRORs")
}

fn installed_schema() -> Option<pg_sys::Oid> {
    catalog::extension_installed(c"embeddinggemma").then(|| catalog::extension_schema(c"embeddinggemma"))
}

/// A pending rewrite: the trigger, the arguments it has, and its new ones.
pub struct Rewrite {
    trigger: OurTrigger,
    args: Vec<String>,
}

/// Before `ALTER TABLE relation RENAME COLUMN old TO new`: the triggers to rewrite after it.
pub fn column_renamed(relation: pg_sys::Oid, old: &str, new: &str) -> Vec<Rewrite> {
    let family = catalog::family(relation);
    let mut out = Vec::new();
    for t in our_triggers() {
        let mut args = t.args.clone();
        if family.contains(&t.table) {
            for &i in column_args(&t.function) {
                if args.get(i).is_some_and(|a| a == old) {
                    args[i] = new.to_string();
                }
            }
        }
        // A chunk trigger names its chunk table's key column.
        if t.function == "embeddinggemma_chunk_trigger" && args.len() >= 4 && args[3] == old {
            let chunk_table = crate::write::chunk_settings::resolve_chunk_table(t.table, &args[2]);
            if chunk_table.is_some_and(|c| family.contains(&c)) {
                args[3] = new.to_string();
            }
        }
        if args != t.args {
            out.push(Rewrite { trigger: t, args });
        }
    }
    out
}

/// Before `ALTER TABLE relation RENAME TO new`: chunk triggers naming it as their chunk table.
pub fn table_renamed(relation: pg_sys::Oid, new: &str) -> Vec<Rewrite> {
    let mut out = Vec::new();
    for t in our_triggers().into_iter().filter(|t| t.function == "embeddinggemma_chunk_trigger" && t.args.len() >= 3) {
        if crate::write::chunk_settings::resolve_chunk_table(t.table, &t.args[2]) != Some(relation) {
            continue;
        }
        let mut args = t.args.clone();
        // Qualified as before: a bare name is looked up in the documents' schema.
        args[2] = match crate::write::chunk_settings::parse_ident(&args[2]).as_deref() {
            Some([schema, _]) => format!("{}.{}", quote::ident(schema), quote::ident(new)),
            _ => quote::ident(new),
        };
        out.push(Rewrite { trigger: t, args });
    }
    out
}

/// Before `ALTER TABLE relation SET SCHEMA schema`: chunk triggers naming it as their chunk
/// table name it in its new schema (a bare name would find another table of the old one).
pub fn table_moved(relation: pg_sys::Oid, schema: &str) -> Vec<Rewrite> {
    let name = catalog::relation_name(relation);
    chunk_triggers_on(|table, arg| {
        (crate::write::chunk_settings::resolve_chunk_table(table, arg) == Some(relation))
            .then(|| format!("{}.{}", quote::ident(schema), quote::ident(&name)))
    })
}

/// Before `ALTER SCHEMA old RENAME TO new`: chunk triggers naming a chunk table as `old.table`.
pub fn schema_renamed(old: &str, new: &str) -> Vec<Rewrite> {
    chunk_triggers_on(|table, arg| match crate::write::chunk_settings::parse_ident(arg).as_deref() {
        Some([schema, name])
            if schema == old && crate::write::chunk_settings::resolve_chunk_table(table, arg).is_some() =>
        {
            Some(format!("{}.{}", quote::ident(new), quote::ident(name)))
        }
        _ => None,
    })
}

/// Chunk triggers whose chunk table argument `rename` gives a new text for.
fn chunk_triggers_on(rename: impl Fn(pg_sys::Oid, &str) -> Option<String>) -> Vec<Rewrite> {
    let mut out = Vec::new();
    for t in our_triggers().into_iter().filter(|t| t.function == "embeddinggemma_chunk_trigger" && t.args.len() >= 3) {
        if let Some(new) = rename(t.table, &t.args[2]) {
            let mut args = t.args.clone();
            args[2] = new;
            out.push(Rewrite { trigger: t, args });
        }
    }
    out
}

/// Whether the current role may change triggers of `table` (it owns it, through membership).
fn owns(table: pg_sys::Oid) -> bool {
    let sql =
        "SELECT pg_catalog.pg_has_role(relowner, 'USAGE') FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) $1";
    spi::one::<bool>(sql, &[text_param(table)]) == Some(true)
}

/// Arguments as `pg_get_triggerdef` ends a definition with them: `('a', 'b')`, each quoted by
/// `simple_quote_literal`.
fn rendered_args(args: &[String]) -> String {
    // SAFETY: reads a GUC variable of this backend.
    let doubles_backslash = !unsafe { pg_sys::standard_conforming_strings };
    let quoted = args.iter().map(|a| {
        let mut q = String::with_capacity(a.len() + 2);
        q.push('\'');
        for ch in a.chars() {
            if ch == '\'' || (ch == '\\' && doubles_backslash) {
                q.push(ch);
            }
            q.push(ch);
        }
        q.push('\'');
        q
    });
    format!("({})", quoted.collect::<Vec<_>>().join(", "))
}

/// After the rename: each trigger made again with its new arguments (same name, events,
/// condition and table), as its table's owner, and a NOTICE saying so. The definition
/// PostgreSQL prints is cut exactly where its known arguments begin (they are a table owner's
/// text: never searched for keywords). A trigger on a table of a role the current one is not a
/// member of is not touched: a WARNING says it now fails.
pub fn apply(rewrites: Vec<Rewrite>) {
    for Rewrite { trigger: t, args } in rewrites {
        if !owns(t.table) {
            crate::pg::errors::warn(
                format!(
                    "embeddinggemma: a trigger on {}, owned by another role, names what was renamed and will fail",
                    catalog::display(t.table)
                ),
                format!(
                    "Its owner can create it again calling {}({}).",
                    t.function,
                    args.iter().map(|a| literal(a)).collect::<Vec<_>>().join(", ")
                ),
            );
            continue;
        }
        let Some(definition) = spi::one::<String>("SELECT pg_catalog.pg_get_triggerdef($1)", &[text_param(t.oid)])
        else {
            continue;
        };
        let Some(head) =
            definition.strip_suffix(&rendered_args(&t.args)).and_then(|call| call.strip_prefix("CREATE TRIGGER "))
        else {
            continue;
        };
        let args = args.iter().map(|a| literal(a)).collect::<Vec<_>>().join(", ");
        let sql = format!("CREATE OR REPLACE TRIGGER {head}({args})");
        crate::pg::rights::as_role(catalog::relation_owner(t.table), || spi::run(&sql, &[]));
        pgrx::notice!("embeddinggemma: trigger {} now calls {}({args})", quote::ident(&t.name), t.function);
    }
}

/// After `ALTER TABLE relation DROP COLUMN column`: a trigger naming it fails every later write
/// (PostgreSQL does not track trigger arguments): a WARNING names the trigger to drop or make
/// again.
pub fn column_dropped(relation: pg_sys::Oid, column: &str) {
    let family = catalog::family(relation);
    for t in our_triggers() {
        let own = family.contains(&t.table)
            && column_args(&t.function).iter().any(|&i| t.args.get(i).is_some_and(|a| a == column));
        let chunk_key = t.function == "embeddinggemma_chunk_trigger"
            && t.args.get(3).is_some_and(|a| a == column)
            && crate::write::chunk_settings::resolve_chunk_table(t.table, &t.args[2])
                .is_some_and(|c| family.contains(&c));
        if own || chunk_key {
            let name = &t.name;
            crate::pg::errors::warn(
                format!("embeddinggemma: trigger \"{name}\" on {} names the dropped column \"{column}\": every write of the table now fails", catalog::display(t.table)),
                "Drop the trigger, or create it again naming existing columns.",
            );
        }
    }
}

/// After `ALTER TABLE relation ALTER COLUMN column TYPE …`: `USING` may have rewritten the texts
/// without firing any row trigger, so the vectors a synchronous trigger keeps from that column
/// may be stale: a WARNING names the way to refill them.
pub fn source_retyped(relation: pg_sys::Oid, column: &str) {
    let family = catalog::family(relation);
    for t in our_triggers().into_iter().filter(|t| family.contains(&t.table)) {
        let source = if t.function == "embeddinggemma_trigger" { 0 } else { 1 };
        if t.args.get(source).is_some_and(|a| a == column) {
            crate::pg::errors::warn(
                format!("embeddinggemma: column \"{column}\" of {} was retyped: vectors its {} kept may no longer match the texts", catalog::display(t.table), t.function),
                "UPDATE … SET the vector column to NULL, then CALL embeddinggemma_backfill(…) to embed them again.",
            );
        }
    }
}
