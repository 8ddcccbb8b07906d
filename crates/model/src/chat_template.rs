//! The checkpoint's chat template (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`): what turns a list of chat messages into the prompt the model was
//! trained on. Rendered with minijinja the way transformers renders it with Jinja2
//! (`apply_chat_template`: blocks trimmed, `raise_exception`, `strftime_now`, a `tojson` with
//! Python's `json.dumps` spacing, Python string methods, `{% generation %}` markers ignored),
//! with the tokenizer's special tokens in scope and `tools` and `documents` none. One
//! difference remains: a message's keys are in sorted order, not the order the request gave.

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;

/// A parsed chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` (empty when the tokenizer has none).
    special_tokens: [(&'static str, String); 4],
}

/// The tokens generation ends at, for a completion that stops where the model's turn or text
/// ends: `config.json`'s `eos_token_id` (`config_eos`), `generation_config.json`'s (what
/// `generate` stops at), and the tokenizer's `eos_token`. A base model whose `config.json`
/// names `<|endoftext|>` thus also stops at its chat template's `<|im_end|>` where
/// `generation_config.json` or the tokenizer names it.
pub fn end_tokens(dir: &Path, config_eos: &[i64], tokenizer: &TextTokenizer) -> Vec<i64> {
    let mut tokens = config_eos.to_vec();
    let json = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    match json("generation_config.json").get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => tokens.extend(n.as_i64()),
        Some(serde_json::Value::Array(ids)) => {
            tokens.extend(ids.iter().filter_map(serde_json::Value::as_i64))
        }
        _ => {}
    }
    let eos = token_text(json("tokenizer_config.json").get("eos_token"));
    tokens.extend(tokenizer.token_id(&eos));
    tokens.sort_unstable();
    tokens.dedup();
    tokens
}

/// `{% generation %}` and `{% endgeneration %}` (transformers' markers of what the assistant
/// generated, which render nothing), in the spellings templates use.
const GENERATION_MARKERS: [&str; 8] = [
    "{% generation %}",
    "{%- generation %}",
    "{% generation -%}",
    "{%- generation -%}",
    "{% endgeneration %}",
    "{%- endgeneration %}",
    "{% endgeneration -%}",
    "{%- endgeneration -%}",
];

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
        let special = |name: &str| token_text(config.get(name));
        Self::new(
            source,
            [
                ("bos_token", special("bos_token")),
                ("eos_token", special("eos_token")),
                ("pad_token", special("pad_token")),
                ("unk_token", special("unk_token")),
            ],
        )
        .map(Some)
    }

    /// A template of `source`, rendered with these special tokens (`bos_token`, `eos_token`,
    /// `pad_token`, `unk_token`).
    pub fn new(source: String, special_tokens: [(&'static str, String); 4]) -> Result<Self> {
        let source = GENERATION_MARKERS
            .iter()
            .fold(source, |s, marker| s.replace(marker, ""));
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
        env.add_function("strftime_now", |format: String| {
            strftime(&time::OffsetDateTime::now_utc(), &format)
        });
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::Tokenizer(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            special_tokens,
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
                tools => Value::from(()),
                documents => Value::from(()),
                ..Value::from_iter(self.special_tokens.iter().map(|(k, v)| (*k, v.clone())))
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

/// `strftime(format)` of `at`, for the common directives (`%Y %y %m %d %e %H %I %M %S %p %b %B
/// %a %A %j %%`); any other is kept as written.
fn strftime(at: &time::OffsetDateTime, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let weekday = at.weekday().to_string();
    let month = MONTHS[usize::from(u8::from(at.month())) - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let twelve = match at.hour() % 12 {
            0 => 12,
            h => h,
        };
        match chars.next() {
            Some('Y') => out.push_str(&at.year().to_string()),
            Some('y') => out.push_str(&format!("{:02}", at.year().rem_euclid(100))),
            Some('m') => out.push_str(&format!("{:02}", u8::from(at.month()))),
            Some('d') => out.push_str(&format!("{:02}", at.day())),
            Some('e') => out.push_str(&format!("{:>2}", at.day())),
            Some('H') => out.push_str(&format!("{:02}", at.hour())),
            Some('I') => out.push_str(&format!("{twelve:02}")),
            Some('M') => out.push_str(&format!("{:02}", at.minute())),
            Some('S') => out.push_str(&format!("{:02}", at.second())),
            Some('p') => out.push_str(if at.hour() < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(&weekday),
            Some('j') => out.push_str(&format!("{:03}", at.ordinal())),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson` filter: Python's `json.dumps(value, ensure_ascii=False, indent=...,
/// separators=..., sort_keys=...)`, so `{"a": 1, "b": [1, 2]}` renders with Python's spacing.
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    dump(&json, indent, &item, &key, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn dump(
    v: &serde_json::Value,
    indent: Option<usize>,
    item: &str,
    key: &str,
    depth: usize,
    out: &mut String,
) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    match v {
        serde_json::Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, depth + 1);
                dump(x, indent, item, key, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        serde_json::Value::Object(fields) if !fields.is_empty() => {
            out.push('{');
            for (i, (k, x)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(key);
                dump(x, indent, item, key, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_trimmed_python_methods_work_and_a_template_may_refuse() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\n{{ bos_token }}{{ m['role'].upper() }}: {{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}ASSISTANT:{% endif %}".into(),
            [
                ("bos_token", "<s>".into()),
                ("eos_token", "</s>".into()),
                ("pad_token", String::new()),
                ("unk_token", String::new()),
            ],
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

    #[test]
    fn tojson_spaces_as_python_and_strftime_formats_dates() {
        let none = || {
            std::array::from_fn(|i| {
                (
                    ["bos_token", "eos_token", "pad_token", "unk_token"][i],
                    String::new(),
                )
            })
        };
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{% generation %}{{ messages[0].content }}{% endgeneration %}".into(),
            none(),
        )
        .unwrap();
        let messages = serde_json::json!([{"content": "é<x>", "role": "user", "n": [1, 2]}]);
        assert_eq!(
            t.render(&messages, false).unwrap(),
            "{\"content\": \"é<x>\", \"n\": [1, 2], \"role\": \"user\"}|{\n  \"content\": \"é<x>\",\n  \"n\": [\n    1,\n    2\n  ],\n  \"role\": \"user\"\n}|é<x>"
        );
        let at = time::Date::from_calendar_date(2026, time::Month::November, 29)
            .unwrap()
            .with_hms(8, 5, 9)
            .unwrap()
            .assume_utc();
        assert_eq!(
            strftime(&at, "%d %b %Y %H:%M:%S %A %%"),
            "29 Nov 2026 08:05:09 Sunday %"
        );
    }
}
