//! Reading a batch's texts and writing its vectors or chunks, as the table's owner (see
//! `owner`). Memory is bounded before anything is read: a batch reads at most
//! `BATCH_TEXT_BYTES` of text, a vector target at most the first `PREFIX_CHARS` characters of
//! a text (the engine embeds at most 2,048 tokens, which lie well inside them), and a chunk
//! document over `CHUNK_DOCUMENT_BYTES` is refused, not read.

use super::owner::{as_owner, Bounds};
use super::target::Target;
use crate::pg::columns::{check_columns, check_source, key_column};
use crate::pg::quote::{ident, relation};
use crate::pg::spi::text_param;
use crate::pg::vector;
use crate::pg::{quote, spi};
use crate::write::chunk_settings::ChunkBatch;
use crate::write::write_back::Writing;

/// Text bytes one batch reads, at most (beyond its first row).
const BATCH_TEXT_BYTES: i64 = 32 << 20;
/// Characters of a text a vector target reads: more than the engine looks at for any text it
/// truncates (2,048 tokens of at most a few dozen bytes each, and the margin of its cut).
pub const PREFIX_CHARS: i64 = 2 << 20;
/// Bytes of a text the prefix can take (4 per character in UTF-8).
const PREFIX_BYTES: i64 = 4 * PREFIX_CHARS;
/// The largest document a chunk target embeds; a larger one fails with a message.
pub const CHUNK_DOCUMENT_BYTES: i64 = 16 << 20;

/// What reading a batch's rows found, per key.
pub enum Found {
    /// The text to embed (a prefix of it, for a long text of a vector target), and the whole
    /// text's length in bytes.
    Text(String, i64),
    /// The row is gone or has no text.
    Nothing,
    /// Over this batch's byte budget: left for a later batch.
    Later,
    /// A chunk document too large to embed: its length in bytes.
    TooLarge(i64),
}

/// The entries' keys as this worker prints them: the queue's binary form read back by the
/// key's type, so that the writer's DateStyle, TimeZone or extra_float_digits never decide
/// which row a key names.
pub fn keys_in_worker_terms(t: &Target, claimed: &mut [super::claims::Claimed]) {
    let documents = crate::pg::columns::open_checked(t.relation);
    let key = key_column(&documents, &t.key);
    // A key type's receive and output functions can run the owner's code (a domain's CHECK).
    as_owner(t.owner(), Bounds::configured(), || {
        for c in claimed.iter_mut() {
            match c.bytes.take() {
                Some((bytes, sent_as)) if sent_as == key.type_oid => {
                    c.key = crate::pg::columns::key_from_binary(&key, &bytes)
                }
                // The key column was retyped since: the text the writer queued.
                _ => {}
            }
        }
    });
}

/// The current texts of `keys`, as the table's owner.
pub fn read(t: &Target, keys: &[String]) -> Vec<Found> {
    let documents = crate::pg::columns::open_checked(t.relation);
    check_source(&documents, &t.source);
    let key = key_column(&documents, &t.key);
    let (prefix, limit, counted) = match t.column {
        Some(_) => (format!("pg_catalog.substr(x.s, 1, {PREFIX_CHARS})"), i64::MAX, PREFIX_BYTES),
        None => ("x.s".to_string(), CHUNK_DOCUMENT_BYTES, CHUNK_DOCUMENT_BYTES),
    };
    // Lengths come from the varlena headers (nothing is decompressed to measure them); only
    // rows within the budget are read. Rows are matched to keys by position: the text a cast
    // gives a key (char(n) without its padding, inet with its mask) need not be the key's.
    let sql = format!(
        "SELECT x.i, CASE WHEN x.fits AND x.len OPERATOR(pg_catalog.<=) {limit} THEN {prefix} END, x.len
           FROM (SELECT u.i, d.{s}::pg_catalog.text AS s,
                        pg_catalog.octet_length(d.{s}::pg_catalog.text) AS len,
                        (pg_catalog.row_number() OVER w OPERATOR(pg_catalog.=) 1
                         OR pg_catalog.sum(LEAST(pg_catalog.octet_length(d.{s}::pg_catalog.text), {counted})) OVER w
                            OPERATOR(pg_catalog.<=) {BATCH_TEXT_BYTES}) AS fits
                   FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u(k, i)
                   JOIN {tbl} d ON d.{k} OPERATOR(pg_catalog.=) u.k::{kt}
                 WINDOW w AS (ORDER BY u.i)) x",
        k = ident(&t.key),
        s = ident(&t.source),
        tbl = quote::table_rows(t.relation),
        kt = key.sql_type()
    );
    let mut found: Vec<Found> = keys.iter().map(|_| Found::Nothing).collect();
    as_owner(t.owner(), Bounds::configured(), || {
        pgrx::spi::Spi::connect_mut(|c| {
            for r in c.update(sql.as_str(), None, &[text_param(keys.to_vec())])? {
                let (i, text, len) = (r.get::<i64>(1)?.unwrap_or_default(), r.get::<String>(2)?, r.get::<i32>(3)?);
                let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| found.get_mut(i)) else { continue };
                *slot = match (text, len) {
                    (Some(text), Some(len)) => Found::Text(text, len.into()),
                    (None, Some(len)) if i64::from(len) > limit => Found::TooLarge(len.into()),
                    (None, Some(_)) => Found::Later,
                    (_, None) => Found::Nothing,
                };
            }
            Ok::<_, pgrx::spi::SpiError>(())
        })
        .expect("SPI reports errors as ERRORs")
    });
    found
}

/// Writes `vectors` of `keys` whose text still starts with `texts` and has the same length (a
/// row changed since has a newer queue entry), as the table's owner; the rows written.
pub fn write_vectors(
    t: &Target,
    column: &str,
    keys: &[String],
    texts: &[String],
    lens: &[i64],
    vectors: &[Vec<f32>],
) -> usize {
    super::owner::require_one_owner(t.relation, None);
    let documents = crate::pg::columns::open_checked(t.relation);
    let vector_type = check_columns(&documents, &t.source, column, t.dim).target_type;
    let key = key_column(&documents, &t.key);
    let sql = format!(
        "UPDATE {tbl} d SET {v} = u.v
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[]),
                           pg_catalog.unnest($3::pg_catalog.int8[]), pg_catalog.unnest($4)) AS u(k, s, n, v)
          WHERE d.{k} OPERATOR(pg_catalog.=) u.k::{kt}
            AND pg_catalog.octet_length(d.{s}::pg_catalog.text) OPERATOR(pg_catalog.=) u.n
            AND pg_catalog.substr(d.{s}::pg_catalog.text, 1, {PREFIX_CHARS}) OPERATOR(pg_catalog.=) u.s",
        tbl = quote::table_rows(t.relation),
        v = ident(column),
        k = ident(&t.key),
        s = ident(&t.source),
        kt = key.sql_type()
    );
    let _writing = Writing::start(t.relation);
    as_owner(t.owner(), Bounds::configured(), || {
        let args = [
            text_param(keys.to_vec()),
            text_param(texts.to_vec()),
            text_param(lens.to_vec()),
            vector::array_param(vectors, vector_type),
        ];
        spi::run(&sql, &args)
    })
}

/// The chunk rows of the documents `keys` with a text (cut and embedded; nothing written).
pub fn embed_chunks(t: &Target, keys: &[String], texts: &[Option<String>]) -> ChunkBatch {
    let documents = crate::pg::columns::open_checked(t.relation);
    let settings = t.chunk_settings(&documents);
    let (live_keys, live_texts): (Vec<String>, Vec<Option<String>>) = keys
        .iter()
        .cloned()
        .zip(texts.iter().cloned())
        .filter(|(_, text)| text.as_deref().is_some_and(|s| !s.is_empty()))
        .unzip();
    settings.embedded_chunks(&live_keys, &live_texts)
}

/// Replaces the chunks of the documents `keys` with `chunks`, as the owner.
pub fn write_chunks(t: &Target, keys: &[String], chunks: ChunkBatch) -> usize {
    super::owner::require_one_owner(t.relation, t.chunk_table);
    let documents = crate::pg::columns::open_checked(t.relation);
    let settings = t.chunk_settings(&documents);
    as_owner(t.owner(), Bounds::configured(), || {
        let delete = format!(
            "DELETE FROM {} c WHERE c.{} OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]::{}[])",
            relation(settings.chunk_table),
            ident(&settings.chunk_key),
            settings.key.sql_type()
        );
        spi::run(&delete, &[text_param(keys.to_vec())]);
        pgrx::spi::Spi::connect_mut(|c| settings.insert_embedded(c, chunks));
    });
    keys.len()
}
