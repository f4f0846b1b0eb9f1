//! A chunk trigger's settings (its arguments, checked against its tables), which the chunk
//! backfill and asynchronous chunk targets share so that all cut alike; and writing chunk rows.

use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use crate::embedding::chunking::{ChunkRows, Cut};
use crate::embedding::texts::Texts;
use crate::pg::catalog;
use crate::pg::columns::{check_columns, check_key, check_source, KeyColumn, SourceColumn};
use crate::pg::errors::raise;
use crate::pg::quote::{ident, relation};
use crate::pg::spi::text_param;
use crate::pg::vector;

pub(super) const USAGE: &str = "CREATE TRIGGER docs_chunks AFTER INSERT OR UPDATE OR DELETE ON docs FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', 'doc_chunks', 'doc_id' [, max_tokens [, overlap [, task [, dim]]]]);";
const CHUNK_TABLE_HINT: &str = "CREATE TABLE doc_chunks (doc_id bigint REFERENCES docs ON DELETE CASCADE ON UPDATE CASCADE, chunk int, start_offset int, end_offset int, body text, embedding vector(768), PRIMARY KEY (doc_id, chunk));";

/// A chunk trigger's arguments, checked against its tables.
pub struct ChunkSettings {
    pub key: KeyColumn,
    pub source: String,
    pub source_column: SourceColumn,
    pub chunk_table: pg_sys::Oid,
    pub chunk_key: String,
    pub max_tokens: i32,
    pub overlap: i32,
    pub task: String,
    pub dim: i32,
    /// The chunk table's embedding column type (pgvector's `vector`).
    pub vector_type: pg_sys::Oid,
}

pub(super) fn misuse(what: impl Into<String>, hint: &str) -> ! {
    raise(PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION, what, hint)
}

/// The chunk table a trigger argument names: `schema.table` as written, or `table` in the
/// schema of the documents' table — never through a writer's search_path, so no writer can
/// redirect the chunks to a table of their own.
///
/// On a Citus shard of the documents, the distributed chunk table it names stands for its shard
/// beside this one (chunk and documents tables co-located by the document key).
pub fn resolve_chunk_table(documents: pg_sys::Oid, name: &str) -> Option<pg_sys::Oid> {
    let named = resolve_name(documents, name)?;
    let Some((shard, _)) = crate::pg::citus::shard_of(documents) else { return Some(named) };
    if !crate::pg::citus::is_distributed(named) {
        return Some(named);
    }
    Some(crate::pg::citus::colocated_shard(shard, named).unwrap_or_else(|why| {
        misuse(
            format!("embeddinggemma: the chunk table of shard {}: {why}", catalog::display(documents)),
            "Distribute the chunk table by the document key, co-located with the documents: SELECT create_distributed_table('doc_chunks', 'doc_id', colocate_with => 'docs');",
        )
    }))
}

fn resolve_name(documents: pg_sys::Oid, name: &str) -> Option<pg_sys::Oid> {
    // On a shard, a bare name is looked up in the schema of the documents' table, as on the
    // coordinator (shards live in their table's schema).
    let parts = parse_ident(name)?;
    match parts.as_slice() {
        [table] => {
            // SAFETY: a catalog lookup of an existing relation's schema.
            let schema = unsafe { pg_sys::get_rel_namespace(documents) };
            catalog::relation_in(schema, table)
        }
        [schema, table] => catalog::relation_in(catalog::schema_oid(schema)?, table),
        _ => None,
    }
}

/// `name` split into identifiers as PostgreSQL reads a qualified name: dots separate them,
/// double quotes keep case and dots (`""` is a quote), unquoted parts are trimmed and
/// lower-cased. None when it is not such a name.
pub fn parse_ident(name: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = name.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut part = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next()? {
                    '"' if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    '"' => break,
                    c => part.push(c),
                }
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
        } else {
            while let Some(c) = chars.next_if(|&c| c != '.' && c != '"') {
                part.push(c);
            }
            part = part.trim().to_ascii_lowercase();
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => {}
            Some(_) => return None,
        }
    }
}

impl ChunkSettings {
    /// Parses and checks the arguments of a chunk trigger on `documents`.
    pub fn parse(documents: &PgRelation, args: &[String]) -> ChunkSettings {
        if !(4..=8).contains(&args.len()) {
            misuse("embeddinggemma_chunk_trigger() takes a key column, a text column, a chunk table and its key column, then optionally max_tokens, overlap, task and dim", USAGE)
        }
        let number = |i: usize, default: i32| args.get(i).map_or(Some(default), |a| a.trim().parse::<i32>().ok());
        let (Some(max_tokens), Some(overlap), Some(dim)) = (number(4, 512), number(5, 64), number(7, 768)) else {
            let arg = |i: usize| args.get(i).map_or("NULL", String::as_str).to_string();
            misuse(
                format!(
                    "embeddinggemma_chunk_trigger(): max_tokens, overlap and dim must be integers, not {}, {}, {}",
                    arg(4),
                    arg(5),
                    arg(7)
                ),
                USAGE,
            )
        };
        let Some(chunk_table) = resolve_chunk_table(documents.oid(), &args[2]) else {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("embeddinggemma: chunk table {} does not exist in the schema of {}", args[2], catalog::display(documents.oid())),
                format!("An unqualified chunk table is looked up in the schema of the documents' table; name another schema as schema.table. {CHUNK_TABLE_HINT}"),
            )
        };
        let task = args.get(6).map_or("document", String::as_str);
        ChunkSettings::check(documents, &args[0], &args[1], chunk_table, &args[3], (max_tokens, overlap), task, dim)
    }

    /// Checks a documents table and its chunk table for these settings.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        documents: &PgRelation,
        key: &str,
        source: &str,
        chunk_table: pg_sys::Oid,
        chunk_key: &str,
        (max_tokens, overlap): (i32, i32),
        task: &str,
        dim: i32,
    ) -> ChunkSettings {
        let key = check_key(documents, key);
        let chunks = crate::pg::columns::open_checked(chunk_table);
        let vector_type = check_columns(&chunks, "body", "embedding", dim).target_type;
        for column in [chunk_key, "chunk", "start_offset", "end_offset"] {
            if !chunks.tuple_desc().iter().any(|a| !a.attisdropped && a.name() == column) {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    format!("embeddinggemma: chunk table {} has no column \"{column}\"", catalog::display(chunk_table)),
                    format!("A chunk table has the columns {}, chunk, start_offset, end_offset, body and embedding: {CHUNK_TABLE_HINT}", ident(chunk_key)),
                )
            }
        }
        let source_column = check_source(documents, source);
        ChunkSettings {
            key,
            source: source.to_string(),
            source_column,
            chunk_table,
            chunk_key: chunk_key.to_string(),
            max_tokens,
            overlap,
            task: task.to_string(),
            dim,
            vector_type,
        }
    }

    /// `INSERT` of chunk rows from parallel arrays: text keys ($1, cast to the documents' key
    /// type), chunk numbers, offsets, bodies and vectors ($2–$6).
    pub fn insert_sql(&self) -> String {
        format!(
            "INSERT INTO {chunks} ({ck}, chunk, start_offset, end_offset, body, embedding)
             SELECT u.k::{key_type}, u.c, u.s, u.e, u.b, u.v
               FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.int4[]),
                               pg_catalog.unnest($3::pg_catalog.int4[]), pg_catalog.unnest($4::pg_catalog.int4[]),
                               pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6)) AS u(k, c, s, e, b, v)",
            chunks = relation(self.chunk_table),
            ck = ident(&self.chunk_key),
            key_type = self.key.sql_type(),
        )
    }

    /// Cuts and embeds `texts`, then inserts their chunks under `keys` (text forms of the
    /// documents' keys, in the same order).
    pub fn insert_chunks(&self, client: &mut pgrx::spi::SpiClient<'_>, keys: &[String], texts: &[Option<String>]) {
        let docs = Texts::collect(texts.iter().map(|t| t.as_deref()));
        let rows = ChunkRows::new(docs, Cut::new(self.max_tokens, self.overlap, &self.task), Some(self.dim));
        let sql = self.insert_sql();
        let mut batch = ChunkBatch::default();
        for (doc, chunk, start, end, body, vector) in rows {
            batch.keys.push(keys[doc as usize - 1].clone());
            batch.chunks.push(chunk);
            batch.starts.push(start);
            batch.ends.push(end);
            batch.bodies.push(body);
            batch.vectors.push(vector.expect("embed_chunks rows have vectors"));
            if batch.keys.len() == crate::embedding::texts::WINDOW_TEXTS {
                batch.insert(client, &sql, self.vector_type);
            }
        }
        batch.insert(client, &sql, self.vector_type);
    }

    /// Cuts and embeds `texts` (nothing written): their chunk rows under `keys`. The
    /// asynchronous worker embeds outside the owner's time-bounded work, then inserts them with
    /// `insert_embedded`.
    pub fn embedded_chunks(&self, keys: &[String], texts: &[Option<String>]) -> ChunkBatch {
        let docs = Texts::collect(texts.iter().map(|t| t.as_deref()));
        let mut batch = ChunkBatch::default();
        for (doc, chunk, start, end, body, vector) in
            ChunkRows::new(docs, Cut::new(self.max_tokens, self.overlap, &self.task), Some(self.dim))
        {
            batch.keys.push(keys[doc as usize - 1].clone());
            batch.chunks.push(chunk);
            batch.starts.push(start);
            batch.ends.push(end);
            batch.bodies.push(body);
            batch.vectors.push(vector.expect("embed_chunks rows have vectors"));
        }
        batch
    }

    /// Inserts chunk rows made by `embedded_chunks`, `WINDOW_TEXTS` at a time.
    pub fn insert_embedded(&self, client: &mut pgrx::spi::SpiClient<'_>, mut rows: ChunkBatch) {
        let sql = self.insert_sql();
        while !rows.keys.is_empty() {
            let n = rows.keys.len().min(crate::embedding::texts::WINDOW_TEXTS);
            let mut part = ChunkBatch {
                keys: rows.keys.drain(..n).collect(),
                chunks: rows.chunks.drain(..n).collect(),
                starts: rows.starts.drain(..n).collect(),
                ends: rows.ends.drain(..n).collect(),
                bodies: rows.bodies.drain(..n).collect(),
                vectors: rows.vectors.drain(..n).collect(),
            };
            part.insert(client, &sql, self.vector_type);
        }
    }
}

/// Chunk rows (keys, numbers, offsets, bodies, vectors) as parallel columns.
#[derive(Default)]
pub struct ChunkBatch {
    keys: Vec<String>,
    chunks: Vec<i32>,
    starts: Vec<i32>,
    ends: Vec<i32>,
    bodies: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

impl ChunkBatch {
    fn insert(&mut self, client: &mut pgrx::spi::SpiClient<'_>, sql: &str, vector_type: pg_sys::Oid) {
        if self.keys.is_empty() {
            return;
        }
        let b = std::mem::take(self);
        let args = [
            text_param(b.keys),
            text_param(b.chunks),
            text_param(b.starts),
            text_param(b.ends),
            text_param(b.bodies),
            vector::array_param(&b.vectors, vector_type),
        ];
        client.update(sql, None, &args).expect("SPI reports errors as ERRORs");
    }
}
