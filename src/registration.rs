//! The appservice registration file (Matrix spec, "Registration") and `generate-registration`.

use rand::{Rng, distr::Alphanumeric};
use serde::Serialize;

use crate::config::Config;

#[derive(Serialize)]
struct Namespace {
    regex: String,
    exclusive: bool,
}

#[derive(Serialize)]
struct Namespaces {
    users: Vec<Namespace>,
    aliases: Vec<Namespace>,
    rooms: Vec<Namespace>,
}

#[derive(Serialize)]
struct Registration<'a> {
    id: &'a str,
    url: &'a str,
    as_token: &'a str,
    hs_token: &'a str,
    sender_localpart: &'a str,
    rate_limited: bool,
    receive_ephemeral: bool,
    #[serde(rename = "de.sorunome.msc2409.push_ephemeral")]
    push_ephemeral_unstable: bool,
    push_ephemeral: bool,
    #[serde(
        rename = "org.matrix.msc3202",
        skip_serializing_if = "std::ops::Not::not"
    )]
    msc3202: bool,
    #[serde(
        rename = "io.element.msc4190",
        skip_serializing_if = "std::ops::Not::not"
    )]
    msc4190: bool,
    namespaces: Namespaces,
    protocols: Vec<&'a str>,
}

/// A fresh random token.
pub fn random_token() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(64)
        .map(char::from)
        .collect()
}

/// The registration YAML for `cfg` (whose tokens must already be set).
pub fn registration_yaml(cfg: &Config) -> String {
    let bot_regex = format!(
        "@{}:{}",
        regex::escape(&cfg.appservice.bot.username),
        regex::escape(&cfg.homeserver.domain)
    );
    let reg = Registration {
        id: &cfg.appservice.id,
        url: &cfg.appservice.address,
        as_token: &cfg.appservice.as_token,
        hs_token: &cfg.appservice.hs_token,
        sender_localpart: &cfg.appservice.bot.username,
        rate_limited: false,
        receive_ephemeral: true,
        push_ephemeral_unstable: true,
        push_ephemeral: true,
        msc3202: cfg.encryption.appservice,
        msc4190: cfg.encryption.msc4190,
        namespaces: Namespaces {
            users: vec![
                Namespace {
                    regex: cfg.ghost_regex(),
                    exclusive: true,
                },
                Namespace {
                    regex: bot_regex,
                    exclusive: true,
                },
            ],
            aliases: vec![],
            rooms: vec![],
        },
        protocols: vec!["interop"],
    };
    serde_yaml::to_string(&reg).expect("the registration serializes")
}

/// Replaces the values of `as_token` and `hs_token` in a config file's text, keeping comments.
pub fn write_tokens_into(
    config_text: &str,
    as_token: &str,
    hs_token: &str,
) -> Result<String, String> {
    let mut out = String::with_capacity(config_text.len());
    let (mut seen_as, mut seen_hs) = (false, false);
    for line in config_text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let eol = if line.ends_with('\n') { "\n" } else { "" };
        if !seen_as && trimmed.starts_with("as_token:") {
            out.push_str(&format!("{indent}as_token: \"{as_token}\"{eol}"));
            seen_as = true;
        } else if !seen_hs && trimmed.starts_with("hs_token:") {
            out.push_str(&format!("{indent}hs_token: \"{hs_token}\"{eol}"));
            seen_hs = true;
        } else {
            out.push_str(line);
        }
    }
    if !seen_as || !seen_hs {
        return Err(
            "the config has no appservice.as_token / appservice.hs_token lines to fill in".into(),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EXAMPLE_CONFIG;

    #[test]
    fn tokens_are_written_back_and_registration_is_complete() {
        let (a, h) = (random_token(), random_token());
        assert_ne!(a, h);
        let example = EXAMPLE_CONFIG.replace(
            "gateway_public_key: \"\"",
            "gateway_public_key: \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
        );
        let text = write_tokens_into(&example, &a, &h).expect("writes");
        assert!(
            text.contains("# matrix-interop-bridge configuration."),
            "comments kept"
        );
        let cfg = Config::from_yaml(&text).expect("valid after tokens");
        assert_eq!(cfg.appservice.as_token, a);
        let reg: serde_yaml::Value = serde_yaml::from_str(&registration_yaml(&cfg)).expect("yaml");
        assert_eq!(reg["as_token"].as_str(), Some(a.as_str()));
        assert_eq!(reg["hs_token"].as_str(), Some(h.as_str()));
        assert_eq!(reg["rate_limited"].as_bool(), Some(false));
        assert_eq!(reg["receive_ephemeral"].as_bool(), Some(true));
        assert_eq!(reg["io.element.msc4190"].as_bool(), Some(true));
        assert_eq!(reg["org.matrix.msc3202"].as_bool(), Some(true));
        assert_eq!(reg["sender_localpart"].as_str(), Some("interopbot"));
        assert_eq!(
            reg["namespaces"]["users"][0]["exclusive"].as_bool(),
            Some(true)
        );
        assert_eq!(
            reg["namespaces"]["users"][0]["regex"].as_str(),
            Some("@interop_.+:example\\.org")
        );
    }
}
