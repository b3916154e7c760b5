//! What an LLM call cost: a price table per model in the JSON format of LiteLLM's
//! `model_prices_and_context_window.json` (so users drop in the table they already maintain),
//! with a small built-in default, and the USD of one call from the usage read off its response.

use crate::config::LlmApi;
use crate::record::Usage;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

/// List prices (USD per token) of common models; a `pricing.file` replaces them.
const BUILTIN: &str = include_str!("builtin_prices.json");

/// Prices per token of one model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Price {
    pub input_cost_per_token: f64,
    pub output_cost_per_token: f64,
    /// Cached input (OpenAI's cached tokens, Anthropic's cache reads); the input price if absent.
    #[serde(default)]
    pub cache_read_input_token_cost: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PriceTable {
    models: HashMap<String, Price>,
}

impl PriceTable {
    pub fn builtin() -> PriceTable {
        Self::parse(BUILTIN, "built-in prices").expect("the built-in price table parses")
    }

    /// Reads a LiteLLM-format file. Entries without both token prices (image models,
    /// `sample_spec`) are skipped; a file with no usable entry is an error.
    pub fn load(path: &Path) -> Result<PriceTable, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, what: &str) -> Result<PriceTable, String> {
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("{what}: {e}"))?;
        let models: HashMap<String, Price> = raw
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_value::<Price>(v).ok()?)))
            .collect();
        if models.is_empty() {
            return Err(format!(
                "{what}: no model with input_cost_per_token and output_cost_per_token"
            ));
        }
        Ok(PriceTable { models })
    }

    /// The price of `model` as the provider answered it: by exact name, as `provider/model`,
    /// or without a date suffix (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`).
    pub fn price(&self, provider: &str, model: &str) -> Option<&Price> {
        let undated = strip_date(model);
        // Most lookups hit on the first key: build the others only when needed.
        self.models
            .get(model)
            .or_else(|| self.models.get(&format!("{provider}/{model}")))
            .or_else(|| self.models.get(undated))
            .or_else(|| self.models.get(&format!("{provider}/{undated}")))
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// `gpt-4o-mini-2024-07-18` → `gpt-4o-mini`, `claude-haiku-4-5-20251001` → `claude-haiku-4-5`.
fn strip_date(model: &str) -> &str {
    let b = model.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    if b.len() > 11 && b[b.len() - 11] == b'-' && b[b.len() - 6] == b'-' && b[b.len() - 3] == b'-' {
        let d = &b[b.len() - 10..];
        if digits(&d[..4]) && digits(&d[5..7]) && digits(&d[8..]) {
            return &model[..model.len() - 11];
        }
    }
    if b.len() > 9 && b[b.len() - 9] == b'-' && digits(&b[b.len() - 8..]) {
        return &model[..model.len() - 9];
    }
    model
}

/// USD of one call. OpenAI counts cached tokens inside the input; Anthropic apart from it.
pub fn cost(price: &Price, api: LlmApi, u: &Usage) -> f64 {
    let cached = u.cached_input_tokens as f64;
    let uncached = match api {
        LlmApi::Openai => u.input_tokens.saturating_sub(u.cached_input_tokens) as f64,
        LlmApi::Anthropic => u.input_tokens as f64,
    };
    uncached * price.input_cost_per_token
        + cached
            * price
                .cache_read_input_token_cost
                .unwrap_or(price.input_cost_per_token)
        + u.output_tokens as f64 * price.output_cost_per_token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_found_by_name_provider_or_undated_name() {
        let t = PriceTable::builtin();
        assert!(t.len() >= 8);
        let p = t.price("openai", "gpt-4o-mini").unwrap();
        assert_eq!(t.price("openai", "gpt-4o-mini-2024-07-18"), Some(p));
        assert!(t.price("anthropic", "claude-haiku-4-5-20251001").is_some());
        assert!(t.price("openai", "no-such-model").is_none());
    }

    #[test]
    fn cost_follows_each_provider_s_usage_accounting() {
        let p = Price {
            input_cost_per_token: 1e-6,
            output_cost_per_token: 4e-6,
            cache_read_input_token_cost: Some(0.5e-6),
        };
        let u = Usage {
            input_tokens: 1000,
            output_tokens: 100,
            cached_input_tokens: 200,
        };
        // OpenAI: 800 uncached + 200 cached inside the 1000.
        let openai = cost(&p, LlmApi::Openai, &u);
        assert!(
            (openai - (800e-6 + 100e-6 + 400e-6)).abs() < 1e-12,
            "{openai}"
        );
        // Anthropic: 1000 uncached, 200 cache reads on top.
        let anthropic = cost(&p, LlmApi::Anthropic, &u);
        assert!(
            (anthropic - (1000e-6 + 100e-6 + 400e-6)).abs() < 1e-12,
            "{anthropic}"
        );
    }

    #[test]
    fn a_litellm_file_loads_and_skips_entries_without_token_prices() {
        let dir = std::env::temp_dir().join(format!("agentmesh-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("prices.json");
        std::fs::write(
            &f,
            r#"{"sample_spec": {"max_tokens": "set to max_output_tokens if provider specifies it"},
                "dall-e-3": {"output_cost_per_image": 0.04},
                "my-model": {"input_cost_per_token": 2e-6, "output_cost_per_token": 8e-6, "litellm_provider": "openai", "mode": "chat"}}"#,
        )
        .unwrap();
        let t = PriceTable::load(&f).unwrap();
        assert_eq!(t.len(), 1);
        assert!(t.price("openai", "my-model").is_some());
        std::fs::write(&f, r#"{"sample_spec": {}}"#).unwrap();
        assert!(PriceTable::load(&f).unwrap_err().contains("no model"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
