//! File discovery's endpoint files, read as TOML and as JSON: any content is refused with
//! an error or gives endpoints at distinct addresses, which written back in either format
//! read back to the same set.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_core::discover::file::parse;
use mesh_core::endpoint::Endpoint;

fuzz_target!(|data: &[u8]| {
    for name in ["endpoints.toml", "endpoints.json"] {
        let Ok(set) = parse(Path::new(name), data) else {
            continue;
        };
        let endpoints: Vec<&Endpoint> = set.iter().collect();
        let mut table = toml::Table::new();
        table.insert(
            "endpoints".to_owned(),
            toml::Value::try_from(&endpoints).expect("endpoints serialize to TOML"),
        );
        let toml = toml::to_string(&table).expect("a table serializes");
        let back = parse(Path::new("back.toml"), toml.as_bytes());
        assert_eq!(back.ok().as_ref(), Some(&set), "TOML round trip of {toml}");
        let json = serde_json::json!({ "endpoints": endpoints }).to_string();
        let back = parse(Path::new("back.json"), json.as_bytes());
        assert_eq!(back.ok().as_ref(), Some(&set), "JSON round trip of {json}");
    }
});
