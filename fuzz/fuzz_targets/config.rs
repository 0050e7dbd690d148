//! Configuration: parsing and validating any text never panics, and a valid config
//! serializes to text that loads back to an equal config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::config::MeshConfig;

fuzz_target!(|data: &str| {
    let Ok(config) = MeshConfig::from_toml(data) else {
        return;
    };
    let text = toml::to_string(&config).expect("a valid config serializes");
    let back = MeshConfig::from_toml(&text).expect("a serialized config loads");
    assert_eq!(back, config);
});
