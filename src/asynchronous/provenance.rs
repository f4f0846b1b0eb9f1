//! What the status view tells of a target: how fast its rows are embedded, the model that
//! embeds them now, and the model its vectors came from.

use super::target::Target;
use crate::embedding::model_info::ModelInfo;
use crate::pg::spi::text_param;
use crate::pg::{catalog, spi};

fn targets_table() -> String {
    catalog::extension_table("embeddinggemma_async_targets").0
}

/// The model identity vectors of `t` get now, as the status view shows it.
fn provenance(model: &ModelInfo, t: &Target) -> String {
    serde_json::json!({
        "weights_sha256": model.checksums.get("model.safetensors"),
        "dtype": model.dtype,
        "task": t.task,
        "dim": t.dim,
        "extension": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
}

pub fn record_batch(t: &Target, n: usize, rate: f64) {
    // Entries of rows deleted meanwhile write nothing: they tell nothing of the rate either.
    if n == 0 {
        return;
    }
    let smoothed = t.rows_per_second.map_or(rate, |r| 0.7 * r + 0.3 * rate);
    spi::run(
        &format!(
            "UPDATE {} SET embedded = embedded OPERATOR(pg_catalog.+) $2, last_embedded_at = pg_catalog.now(), rows_per_second = $3
              WHERE id OPERATOR(pg_catalog.=) $1",
            targets_table()
        ),
        &[text_param(t.id), text_param(n as i64), text_param(smoothed)],
    );
}

pub fn record_serving(targets: &[Target], model: &ModelInfo) {
    let table = targets_table();
    for t in targets {
        let now = provenance(model, t);
        if t.serving.as_deref() != Some(now.as_str()) {
            spi::run(
                &format!("UPDATE {table} SET serving = $2::pg_catalog.jsonb WHERE id OPERATOR(pg_catalog.=) $1"),
                &[text_param(t.id), text_param(now)],
            );
        }
    }
}

/// A target whose queue is empty and whose scan is done has every row embedded by the serving
/// model since it was registered or re-embedded: that is then the model its vectors came from.
/// (Rows written after a model change keep it stale until a re-embed; a target registered with
/// keep_existing has vectors it did not write, and no model until a re-embed.)
pub fn settle_models(targets: &[Target]) {
    let table = targets_table();
    let (queue, _) = catalog::extension_table("embeddinggemma_async_queue");
    for t in targets.iter().filter(|t| t.model.is_none() && !t.scanning) {
        spi::run(
            &format!(
                "UPDATE {table} t SET model = t.serving WHERE t.id OPERATOR(pg_catalog.=) $1 AND t.serving IS NOT NULL AND NOT t.kept_existing AND NOT t.scanning
                    AND NOT EXISTS (SELECT FROM {queue} q WHERE q.target_id OPERATOR(pg_catalog.=) t.id)"
            ),
            &[text_param(t.id)],
        );
    }
}
