#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| embeddinggemma_engine::fuzzing::model_config(data));
