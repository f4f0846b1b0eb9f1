//! A target as the worker reads it, and the queueing of the rows present when it was
//! registered (or re-embedded), a window of rows at a time.

use pgrx::{pg_sys, PgRelation};

use super::owner::{as_owner, Bounds};
use crate::pg::columns::key_column;
use crate::pg::quote::{ident, relation};
use crate::pg::spi::text_param;
use crate::pg::{catalog, quote, spi};
use crate::write::chunk_settings::ChunkSettings;

/// Rows present at registration queued per transaction.
const SCAN_ROWS: i64 = 10_000;

#[derive(Clone)]
pub struct Target {
    pub id: i32,
    pub relation: pg_sys::Oid,
    pub key: String,
    pub source: String,
    /// The vector column, or None for a chunk target.
    pub column: Option<String>,
    pub chunk_table: Option<pg_sys::Oid>,
    pub chunk_key: Option<String>,
    pub task: String,
    pub dim: i32,
    pub max_tokens: i32,
    pub overlap: i32,
    pub max_attempts: i32,
    pub scanning: bool,
    pub scan_all: bool,
    pub scan_after: Option<String>,
    pub model: Option<String>,
    pub serving: Option<String>,
    pub rows_per_second: Option<f64>,
}

/// Whether this database has the extension at this library's version (the worker's tables are
/// its; an install not yet updated with `ALTER EXTENSION embeddinggemma UPDATE` is left alone).
pub fn installed() -> bool {
    let sql = "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'embeddinggemma'";
    match spi::one::<String>(sql, &[]) {
        Some(version) if version == env!("CARGO_PKG_VERSION") => true,
        Some(version) => {
            pgrx::log!("embeddinggemma async: the extension is at version {version}, its library at {}: ALTER EXTENSION embeddinggemma UPDATE lets the worker drain", env!("CARGO_PKG_VERSION"));
            false
        }
        None => false,
    }
}

/// Every target of this database, by id; none without the extension.
pub fn targets() -> Vec<Target> {
    if !installed() {
        return Vec::new();
    }
    let (targets, _) = catalog::extension_table("embeddinggemma_async_targets");
    let sql = format!(
        "SELECT id, relation::pg_catalog.oid, key_column, source, target, chunk_table::pg_catalog.oid, chunk_key, task, dim,
                COALESCE(max_tokens, 0), COALESCE(overlap, 0), max_attempts, scanning, scan_all, scan_after,
                model::pg_catalog.text, serving::pg_catalog.text, rows_per_second
           FROM {targets} ORDER BY id"
    );
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql.as_str(), None, &[])?;
        let mut out = Vec::new();
        for r in rows {
            let chunk_table: Option<pg_sys::Oid> = r.get(6)?;
            out.push(Target {
                id: r.get(1)?.unwrap_or_default(),
                relation: r.get(2)?.unwrap_or_default(),
                key: r.get(3)?.unwrap_or_default(),
                source: r.get(4)?.unwrap_or_default(),
                column: if chunk_table.is_none() { r.get(5)? } else { None },
                chunk_table,
                chunk_key: r.get(7)?,
                task: r.get(8)?.unwrap_or_default(),
                dim: r.get(9)?.unwrap_or(768),
                max_tokens: r.get(10)?.unwrap_or(0),
                overlap: r.get(11)?.unwrap_or(0),
                max_attempts: r.get(12)?.unwrap_or(5),
                scanning: r.get(13)?.unwrap_or(false),
                scan_all: r.get(14)?.unwrap_or(false),
                scan_after: r.get(15)?,
                model: r.get(16)?,
                serving: r.get(17)?,
                rows_per_second: r.get(18)?,
            });
        }
        Ok::<_, pgrx::spi::SpiError>(out)
    })
    .expect("SPI reports errors as ERRORs")
}

impl Target {
    pub fn chunk_settings(&self, documents: &PgRelation) -> ChunkSettings {
        let chunk_table = self.chunk_table.expect("a chunk target");
        let chunk_key = self.chunk_key.as_deref().unwrap_or("doc_id");
        ChunkSettings::check(
            documents,
            &self.key,
            &self.source,
            chunk_table,
            chunk_key,
            (self.max_tokens, self.overlap),
            &self.task,
            self.dim,
        )
    }

    pub fn owner(&self) -> pg_sys::Oid {
        catalog::relation_owner(self.relation)
    }

    /// The condition on a documents row `d` that it needs embedding when its target is scanned.
    fn scan_filter(&self, documents: &PgRelation) -> String {
        let s = ident(&self.source);
        match (&self.column, self.scan_all) {
            (_, true) => format!("d.{s} IS NOT NULL"),
            (Some(column), false) => format!("d.{s} IS NOT NULL AND d.{} IS NULL", ident(column)),
            (None, false) => {
                let c = self.chunk_settings(documents);
                format!(
                    "d.{s} IS NOT NULL AND NOT EXISTS (SELECT FROM {} c WHERE c.{} OPERATOR(pg_catalog.=) d.{})",
                    relation(c.chunk_table),
                    ident(&c.chunk_key),
                    ident(&self.key)
                )
            }
        }
    }

    /// Queues the next `SCAN_ROWS` rows present when the target was registered (or
    /// re-embedded), in key order after the last key done.
    pub fn scan(&self) {
        let (targets, _) = catalog::extension_table("embeddinggemma_async_targets");
        // The scan state as it is now, locked to the end of this transaction: a registration,
        // re-embed or attached partition that restarts the scan meanwhile is not overwritten
        // below. Locked by such a command's open transaction: next round.
        let sql = format!(
            "SELECT scan_all, scan_after FROM {targets}
              WHERE id OPERATOR(pg_catalog.=) $1 AND scanning FOR UPDATE SKIP LOCKED"
        );
        let state = pgrx::spi::Spi::connect_mut(|c| {
            let rows = c.update(&sql, Some(1), &[text_param(self.id)])?;
            if rows.is_empty() {
                return Ok::<_, pgrx::spi::SpiError>(None);
            }
            let row = rows.first();
            Ok(Some((row.get::<bool>(1)?.unwrap_or(false), row.get::<String>(2)?)))
        })
        .expect("SPI reports errors as ERRORs");
        let Some((scan_all, scan_after)) = state else { return };
        Target { scan_all, scan_after, ..self.clone() }.scan_locked(&targets);
    }

    fn scan_locked(&self, targets: &str) {
        let documents = crate::pg::columns::open_checked(self.relation);
        let key = key_column(&documents, &self.key);
        let k = ident(&self.key);
        let after = match self.scan_after {
            Some(_) => format!(" AND d.{k} OPERATOR(pg_catalog.>) $1::{}", key.sql_type()),
            None => String::new(),
        };
        let sql = format!(
            "SELECT d.{k}::pg_catalog.text FROM {} d WHERE {}{after} ORDER BY d.{k} USING OPERATOR(pg_catalog.<) LIMIT {SCAN_ROWS}",
            quote::table_rows(self.relation),
            self.scan_filter(&documents)
        );
        let keys: Vec<String> = as_owner(self.owner(), Bounds::configured(), || {
            let args = [text_param(self.scan_after.clone())];
            pgrx::spi::Spi::connect_mut(|c| {
                let rows = c.update(sql.as_str(), None, if self.scan_after.is_some() { &args[..] } else { &[] })?;
                rows.map(|r| r.get::<String>(1).map(Option::unwrap_or_default)).collect::<Result<Vec<_>, _>>()
            })
            .expect("SPI reports errors as ERRORs")
        });
        let (queue, _) = catalog::extension_table("embeddinggemma_async_queue");
        spi::run(
            &format!(
                "INSERT INTO {queue} (target_id, key) SELECT $1, k FROM pg_catalog.unnest($2::pg_catalog.text[]) AS k"
            ),
            &[text_param(self.id), text_param(keys.clone())],
        );
        let done = (keys.len() as i64) < SCAN_ROWS;
        spi::run(
            &format!(
                "UPDATE {targets} SET scanning = NOT $2, scan_all = scan_all AND NOT $2, scan_after = CASE WHEN $2 THEN NULL ELSE $3 END
                  WHERE id OPERATOR(pg_catalog.=) $1"
            ),
            &[text_param(self.id), text_param(done), text_param(keys.last().cloned())],
        );
    }
}
