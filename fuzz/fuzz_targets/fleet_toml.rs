#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hiveseed_seeder::fuzz::fleet_toml(data));
