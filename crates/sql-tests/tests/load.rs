//! The short CI version of the load test (bench/service-load runs the full one), against the
//! server with the embedding service (EMBEDDINGGEMMA_TEST_SERVICE_DSN): single-row inserts of
//! 8 sessions through the row trigger are batched across sessions, and new connections embed
//! without ever loading the model. One test: the service is shared state.

use std::time::Duration;

use embeddinggemma_sql_tests::load;

#[test]
fn the_service_batches_row_trigger_inserts_across_sessions_and_backends_never_load_the_model() {
    let dsn = std::env::var("EMBEDDINGGEMMA_TEST_SERVICE_DSN")
        .expect("EMBEDDINGGEMMA_TEST_SERVICE_DSN is not set: run the SQL tests through scripts/test");
    load::wait_for_service(&dsn, Duration::from_secs(180)).unwrap();

    let inserts = load::row_trigger_inserts(&dsn, 8, Duration::from_secs(8)).unwrap();
    eprintln!("{inserts}");
    assert_eq!(inserts.text("mode"), Some("service"), "the server does not run the service: {inserts}");
    assert_eq!(inserts.get("errors"), Some(0.0), "{inserts}");
    assert!(inserts.get("rows").unwrap() > 0.0, "no row inserted: {inserts}");
    assert_eq!(inserts.text("rows_stored"), None, "rows without a vector: {inserts}");
    let per_pass = inserts.get("texts_per_pass").unwrap();
    assert!(per_pass >= 2.0, "{per_pass} texts per forward pass: no batching across sessions ({inserts})");

    let first = load::first_call(&dsn, 5).unwrap();
    eprintln!("{first}");
    assert_eq!(first.get("model_loads_max"), Some(0.0), "a backend loaded the model itself: {first}");
}
