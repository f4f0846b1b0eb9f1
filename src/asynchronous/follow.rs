//! Targets follow their tables through DDL (the extension's event triggers call
//! `embeddinggemma_async_follow` with the tables a command touched): a target knows its
//! columns by number, so a renamed column keeps it working; a dropped table, chunk table or
//! column it needs removes it, with a NOTICE, instead of leaving a target that fails every
//! write or that no one but a superuser could remove.

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation};

use crate::pg::quote::{ident, relation};
use crate::pg::spi::text_param;
use crate::pg::{catalog, rights, spi};

struct Followed {
    id: i32,
    relation: pg_sys::Oid,
    chunk_table: Option<pg_sys::Oid>,
    /// (stored name, attnum, what it is) of each column the target names.
    columns: Vec<(String, Option<i16>, &'static str)>,
}

fn exists(oid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache probe by OID; NULL when no such relation.
    !unsafe { pg_sys::get_rel_name(oid) }.is_null()
}

/// The targets on `relations` (as their table or their chunk table).
fn targets_on(relations: &[pg_sys::Oid]) -> Vec<Followed> {
    let (targets, owner) = catalog::extension_table("embeddinggemma_async_targets");
    let sql = format!(
        "SELECT id, relation::pg_catalog.oid, chunk_table::pg_catalog.oid, key_column, key_attnum, source, source_attnum, target, target_attnum
           FROM {targets} WHERE relation::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1) OR chunk_table::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1)"
    );
    rights::as_role(owner, || {
        pgrx::spi::Spi::connect_mut(|c| {
            let rows = c.update(sql.as_str(), None, &[text_param(relations.to_vec())])?;
            rows.map(|r| {
                let chunk_table: Option<pg_sys::Oid> = r.get(3)?;
                let mut columns = vec![
                    (r.get::<String>(4)?.unwrap_or_default(), r.get::<i16>(5)?, "key"),
                    (r.get::<String>(6)?.unwrap_or_default(), r.get::<i16>(7)?, "source"),
                ];
                if chunk_table.is_none() {
                    columns.push((r.get::<String>(8)?.unwrap_or_default(), r.get::<i16>(9)?, "target"));
                }
                Ok(Followed {
                    id: r.get(1)?.unwrap_or_default(),
                    relation: r.get(2)?.unwrap_or_default(),
                    chunk_table,
                    columns,
                })
            })
            .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
        .expect("SPI reports errors as ERRORs")
    })
}

/// Removes target `id`: its trigger (if its table is still there), its row and its queue.
fn remove(t: &Followed, why: &str) {
    if exists(t.relation) {
        spi::run(
            &format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                ident(&format!("embeddinggemma_async_{}", t.id)),
                relation(t.relation)
            ),
            &[],
        );
    }
    let (targets, owner) = catalog::extension_table("embeddinggemma_async_targets");
    let (queue, _) = catalog::extension_table("embeddinggemma_async_queue");
    rights::as_role(owner, || {
        spi::run(&format!("DELETE FROM {targets} WHERE id OPERATOR(pg_catalog.=) $1"), &[text_param(t.id)]);
        spi::run(&format!("DELETE FROM {queue} WHERE target_id OPERATOR(pg_catalog.=) $1"), &[text_param(t.id)]);
    });
    pgrx::notice!("embeddinggemma: asynchronous target {} removed: {why}", t.id);
}

/// Reconciles the targets on `relations` with the catalog. Safe for any role to call: it only
/// removes targets that can no longer work and renames what was renamed.
#[pg_extern(sql = "")]
fn embeddinggemma_async_follow(relations: Vec<pg_sys::Oid>) {
    for t in targets_on(&relations) {
        if !exists(t.relation) {
            remove(&t, "its table was dropped");
            continue;
        }
        if t.chunk_table.is_some_and(|c| !exists(c)) {
            remove(&t, "its chunk table was dropped");
            continue;
        }
        // SAFETY: an existing relation, opened with a lock to the end of the transaction.
        let rel = unsafe { PgRelation::with_lock(t.relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        let desc = rel.tuple_desc();
        let mut renamed: Vec<(&str, String)> = Vec::new();
        let mut gone = None;
        for (name, attnum, what) in &t.columns {
            let current = match attnum {
                Some(n) if *n >= 1 => {
                    desc.get(*n as usize - 1).filter(|a| !a.attisdropped).map(|a| a.name().to_string())
                }
                // A target of 0.4.0 not yet numbered: by name.
                _ => crate::pg::columns::lookup_column(&rel, name).map(|a| a.name().to_string()),
            };
            match current {
                None => gone = Some(format!("its {what} column \"{name}\" was dropped")),
                Some(now) if now != *name => renamed.push((what, now)),
                Some(_) => {}
            }
        }
        drop(desc);
        drop(rel);
        if let Some(why) = gone {
            remove(&t, &why);
            continue;
        }
        let (targets, owner) = catalog::extension_table("embeddinggemma_async_targets");
        for (what, now) in renamed {
            let column = match what {
                "key" => "key_column",
                "source" => "source",
                _ => "target",
            };
            rights::as_role(owner, || {
                spi::run(
                    &format!("UPDATE {targets} SET {column} = $2 WHERE id OPERATOR(pg_catalog.=) $1"),
                    &[text_param(t.id), text_param(now)],
                )
            });
        }
    }
}
