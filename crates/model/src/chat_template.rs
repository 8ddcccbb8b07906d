//! The checkpoint's chat template (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`): what turns a list of chat messages into the prompt the model was
//! trained on. Rendered with minijinja the way transformers renders it with Jinja2
//! (`apply_chat_template`: blocks trimmed, `raise_exception`, Python string methods), with the
//! tokenizer's `bos_token` and `eos_token` in scope.

use std::path::Path;

use minijinja::{Environment, ErrorKind};

use crate::error::{ModelError, Result};

/// A parsed chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A token given in `tokenizer_config.json` as a string or as an added token's object.
fn token_text(value: Option<&serde_json::Value>) -> String {
    match value {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`, if it has one: `chat_template.jinja` (what
    /// transformers 5 writes), else `tokenizer_config.json`'s `chat_template` (a string, or a
    /// list of named templates of which `default` is taken).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let read = |name: &str| -> Result<Option<String>> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ModelError::Io(e)),
            }
        };
        let config: serde_json::Value = match read("tokenizer_config.json")? {
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                ModelError::Tokenizer(format!("tokenizer_config.json does not parse: {e}"))
            })?,
            None => serde_json::Value::Null,
        };
        let source = match read("chat_template.jinja")? {
            Some(text) => text,
            None => match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(named)) => match named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                {
                    Some(t) => token_text(t.get("template")),
                    None => return Ok(None),
                },
                _ => return Ok(None),
            },
        };
        Self::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        )
        .map(Some)
    }

    /// A template of `source`, rendered with these special tokens.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        // As transformers' sandboxed Jinja2 environment.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::Tokenizer(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt of `messages` (a JSON list of `{role, content, ...}` objects), ending with
    /// the assistant's turn opened when `add_generation_prompt`. A template that refuses the
    /// messages (`raise_exception`, a missing field) is an error naming why.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .expect("added at construction");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| {
                let mut reason = e.to_string();
                if let Some(detail) = e.detail() {
                    reason = format!("{reason}: {detail}");
                }
                ModelError::Tokenizer(format!("the chat template refused the messages: {reason}"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_trimmed_python_methods_work_and_a_template_may_refuse() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\n{{ bos_token }}{{ m['role'].upper() }}: {{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}ASSISTANT:{% endif %}".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let messages = serde_json::json!([{"role": "user", "content": "  hi  "}]);
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<s>USER: hi</s>\nASSISTANT:"
        );
        assert_eq!(t.render(&messages, false).unwrap(), "<s>USER: hi</s>\n");
        let system = serde_json::json!([{"role": "system", "content": "x"}]);
        let err = t.render(&system, true).unwrap_err().to_string();
        assert!(err.contains("no system"), "{err}");
    }
}
