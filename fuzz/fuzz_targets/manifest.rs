#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hiveseed_proto::fuzz::manifest(data));
