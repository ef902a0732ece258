//! Reading JSON bodies (control API states, `lbd apply` files) with the
//! field path of the first error, as the TOML reader gives one.

use serde::de::DeserializeOwned;

use crate::FieldError;

/// Parses `bytes` as JSON into `T`. A syntax or type error names the field
/// it was found in (`listeners[0].idle_timeout`; empty at the top level)
/// and says where in the text (`at line 1 column 120`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    // The path is tracked only once a body has failed: a good one (every
    // state the controller sends) is parsed at full speed.
    let plain = match serde_json::from_slice(bytes) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let error = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(err) => {
            let path = err.path().to_string();
            let path = if path == "." { String::new() } else { path };
            FieldError::new(path, err.into_inner().to_string())
        }
        // Only trailing characters after the value are left to fail.
        Ok(_) => FieldError::new("", plain.to_string()),
    };
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DesiredState;

    #[test]
    fn a_type_error_names_its_field() {
        let body = br#"{"version": 1, "listeners": [{"name": "web", "bind": "127.0.0.1:80",
            "backends": [{"addr": "127.0.0.2:80", "weight": "2"}]}]}"#;
        let err = parse_json::<DesiredState>(body).unwrap_err();
        assert_eq!(err.path, "listeners[0].backends[0].weight");
        assert!(err.message.contains("expected u32"), "{err}");
        assert!(err.message.contains("line 2"), "{err}");
    }

    #[test]
    fn an_unknown_field_and_a_top_level_error_are_placed() {
        let body = br#"{"version": 1, "listeners": [{"name": "web", "bind": "127.0.0.1:80",
            "backends": [], "idle_timout": "5s"}]}"#;
        let err = parse_json::<DesiredState>(body).unwrap_err();
        assert_eq!(err.path, "listeners[0].idle_timout");
        assert!(err.message.contains("unknown field"), "{err}");
        let err = parse_json::<DesiredState>(br#""a state""#).unwrap_err();
        assert_eq!(err.path, "");
        let err = parse_json::<DesiredState>(br#"{"version": 1, "listeners": []} x"#).unwrap_err();
        assert!(err.message.contains("trailing"), "{err}");
    }

    #[test]
    fn a_good_state_parses() {
        let state: DesiredState = parse_json(br#"{"version": 3, "listeners": []}"#).unwrap();
        assert_eq!(state.version, 3);
    }
}
