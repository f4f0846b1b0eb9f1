//! Citus: which relations are distributed tables or their shards, and which shard of one table
//! sits beside a shard of another (co-located), read from Citus's own catalogs
//! (`pg_catalog.pg_dist_*`, present on every node with synced metadata). Without Citus every
//! answer is "no".

use pgrx::pg_sys;

use crate::pg::spi::param;
use crate::pg::{catalog, spi};

/// Whether Citus's catalogs are there.
pub fn installed() -> bool {
    catalog::relation_in(pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE), "pg_dist_partition").is_some()
}

/// Whether `relation` is a hash-distributed table (on the coordinator, or a worker's copy of
/// its metadata) — not one of its shards.
pub fn is_distributed(relation: pg_sys::Oid) -> bool {
    installed()
        && spi::one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition p
                             WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1 AND p.partmethod OPERATOR(pg_catalog.=) 'h')",
            &[param(relation, pg_sys::REGCLASSOID)],
        )
        .unwrap_or(false)
}

/// The local relation of shard `shard` of `table`, when it is on this node.
fn shard_relation(table: pg_sys::Oid, shard: i64) -> Option<pg_sys::Oid> {
    // shard_name() gives the name quoted, qualified where the schema is not public; the shard
    // is in its table's schema, so the last part is the name.
    let name = spi::one::<Vec<String>>(
        "SELECT pg_catalog.parse_ident(pg_catalog.shard_name($1, $2))",
        &[param(table, pg_sys::REGCLASSOID), param(shard, pg_sys::INT8OID)],
    )?;
    // SAFETY: a catalog lookup of an existing relation's schema.
    let schema = unsafe { pg_sys::get_rel_namespace(table) };
    catalog::relation_in(schema, name.last()?)
}

/// If `relation` is a shard: its shard id and its distributed table.
pub fn shard_of(relation: pg_sys::Oid) -> Option<(i64, pg_sys::Oid)> {
    let name = catalog::relation_name(relation);
    // Shard names end in _<shard id> (a long table name is shortened before it).
    let id: i64 = name.rsplit_once('_')?.1.parse().ok()?;
    if !installed() {
        return None;
    }
    let table = spi::one::<pg_sys::Oid>(
        "SELECT s.logicalrelid::pg_catalog.oid FROM pg_catalog.pg_dist_shard s WHERE s.shardid OPERATOR(pg_catalog.=) $1",
        &[param(id, pg_sys::INT8OID)],
    )?;
    (table != relation && shard_relation(table, id) == Some(relation)).then_some((id, table))
}

/// The shard of the distributed table `table` that is co-located with shard `shard` (of
/// another table), if the two tables are co-located; it lives on the same node.
pub fn colocated_shard(shard: i64, table: pg_sys::Oid) -> Result<pg_sys::Oid, String> {
    let peer = spi::one::<i64>(
        "SELECT s2.shardid
           FROM pg_catalog.pg_dist_shard s1
           JOIN pg_catalog.pg_dist_partition p1 ON p1.logicalrelid OPERATOR(pg_catalog.=) s1.logicalrelid
           JOIN pg_catalog.pg_dist_partition p2 ON p2.logicalrelid OPERATOR(pg_catalog.=) $2
                                               AND p2.colocationid OPERATOR(pg_catalog.=) p1.colocationid
           JOIN pg_catalog.pg_dist_shard s2 ON s2.logicalrelid OPERATOR(pg_catalog.=) $2
                                          AND s2.shardminvalue OPERATOR(pg_catalog.=) s1.shardminvalue
          WHERE s1.shardid OPERATOR(pg_catalog.=) $1",
        &[param(shard, pg_sys::INT8OID), param(table, pg_sys::REGCLASSOID)],
    )
    .ok_or_else(|| format!("{} is not co-located with the documents' table", catalog::display(table)))?;
    shard_relation(table, peer)
        .ok_or_else(|| format!("shard {peer} of {} is not on this node", catalog::display(table)))
}

/// Runs `f` with `search_path = pg_catalog, pg_temp`, restored after, as a function's SET
/// clause does: Citus's own plpgsql functions leave names to the caller's path.
fn with_catalog_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level, as fmgr_security_definer opens one; an ERROR in `f` unwinds it
    // with the transaction.
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = f();
        pg_sys::AtEOXact_GUC(true, level);
        result
    }
}

/// Runs `command` on every shard of the distributed `table` at once, each on its worker over a
/// connection of its own, outside a transaction block (a procedure there may commit). It is a
/// format() string: `%L` stands for the shard's name as a literal, `%%` for `%`. Returns
/// (shard id, whether it succeeded, its result).
pub fn on_every_shard(table: pg_sys::Oid, command: &str) -> Vec<(i64, bool, Option<String>)> {
    with_catalog_path(|| {
        pgrx::spi::Spi::connect_mut(|c| {
            let rows = c.update(
                "SELECT r.shardid, r.success, r.result FROM pg_catalog.run_command_on_shards($1, $2) r ORDER BY r.shardid",
                None,
                &[param(table, pg_sys::REGCLASSOID), spi::text_param(command.to_string())],
            )?;
            rows.map(|r| Ok((r.get::<i64>(1)?.unwrap_or_default(), r.get::<bool>(2)?.unwrap_or(false), r.get::<String>(3)?)))
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
        .expect("SPI reports errors as ERRORs")
    })
}

/// `text` as part of a run_command_on_shards command, which is a format() string.
pub fn escape_format(text: &str) -> String {
    text.replace('%', "%%")
}
