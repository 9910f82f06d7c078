//! Prompt/response pairs as token ids: the model's chat format (ChatML, read from the GGUF's chat
//! template) or plain text, and where the response starts.

use tokenizers::Tokenizer;

use super::task::PromptResponse;
use crate::model::{GgufFile, ModelError};
use crate::train::TrainError;

/// How a conversation turns into text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatFormat {
    /// ChatML (`<|im_start|>role\n…<|im_end|>\n`), with the template's default system prompt when
    /// it has one (SmolLM2: "You are a helpful AI assistant named SmolLM, …").
    ChatMl {
        /// The system turn put first, if any.
        system: Option<String>,
    },
    /// No template: the prompt, a newline, the response, the end-of-sequence token.
    Plain,
}

impl ChatFormat {
    /// The format of a chat template: ChatML when it uses `<|im_start|>`, else plain.
    pub fn from_template(template: Option<&str>) -> Self {
        let Some(template) = template.filter(|t| t.contains("<|im_start|>")) else { return Self::Plain };
        let marker = "<|im_start|>system";
        let system = template.find(marker).and_then(|start| {
            let rest = &template[start + marker.len()..];
            let rest = rest.strip_prefix("\\n").or_else(|| rest.strip_prefix('\n'))?;
            let end = rest.find("<|im_end|>")?;
            // A template that builds the system turn from a variable has no default text.
            let text = &rest[..end];
            (!text.contains("{{") && !text.contains('\'') && !text.is_empty()).then(|| text.to_string())
        });
        Self::ChatMl { system }
    }

    /// The text before the response: the conversation up to the assistant's turn.
    pub fn prompt_text(&self, prompt: &str) -> String {
        match self {
            Self::ChatMl { system } => {
                let system =
                    system.as_ref().map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n")).unwrap_or_default();
                format!("{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
            }
            Self::Plain => format!("{prompt}\n"),
        }
    }

    /// The token that ends a response in this format.
    fn end_token(&self) -> &'static str {
        match self {
            Self::ChatMl { .. } => "<|im_end|>",
            Self::Plain => "<|endoftext|>",
        }
    }
}

/// One example as token ids: the formatted prompt, then the response and its end token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmExample {
    /// The example's id.
    pub id: u64,
    /// Prompt then response ids.
    pub ids: Vec<u32>,
    /// How many of `ids` are the prompt (the loss covers `ids[prompt_len..]`).
    pub prompt_len: usize,
    /// The response text (for exact match).
    pub response: String,
    /// The response's index among the task's answers (for macro-F1).
    pub answer: usize,
}

impl LmExample {
    /// The prompt's ids (what generation starts from).
    pub fn prompt(&self) -> &[u32] {
        &self.ids[..self.prompt_len]
    }
}

/// A decoder's tokenizer with its chat format and stop tokens.
#[derive(Clone)]
pub struct LmTokenizer {
    tokenizer: Tokenizer,
    format: ChatFormat,
    end: u32,
    stop: Vec<u32>,
}

impl LmTokenizer {
    /// The tokenizer, chat format and stop tokens stored in a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TrainError> {
        let tokenizer = file.tokenizer()?;
        let format = ChatFormat::from_template(file.string("tokenizer.chat_template"));
        let eos = file.usize("tokenizer.ggml.eos_token_id").ok().map(|e| e as u32);
        Self::new(tokenizer, format, eos)
            .map_err(|message| TrainError::Model(ModelError::Config { path: file.path().to_path_buf(), message }))
    }

    /// A tokenizer with `format`; `eos` (if any) also stops generation.
    pub fn new(tokenizer: Tokenizer, format: ChatFormat, eos: Option<u32>) -> Result<Self, String> {
        let end_text = format.end_token();
        let end = tokenizer
            .token_to_id(end_text)
            .or(eos)
            .ok_or_else(|| format!("the vocabulary has no {end_text} and no end-of-sequence id is given"))?;
        let mut stop = vec![end];
        stop.extend(eos.filter(|&e| e != end));
        Ok(Self { tokenizer, format, end, stop })
    }

    /// The chat format.
    pub fn format(&self) -> &ChatFormat {
        &self.format
    }

    /// The tokens that end a generated answer.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// Token ids of `text` (special tokens matched whole, nothing added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TrainError::Input(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of generated ids, without the stop tokens, trimmed.
    pub fn decode_answer(&self, ids: &[u32]) -> Result<String, TrainError> {
        let kept: Vec<u32> = ids.iter().copied().filter(|t| !self.stop.contains(t)).collect();
        let text = self.tokenizer.decode(&kept, true).map_err(|e| TrainError::Input(format!("cannot decode: {e}")))?;
        Ok(text.trim().to_string())
    }

    /// `pair` formatted and tokenized, at most `max_len` ids: a long prompt loses its start (the
    /// format's head and the response are kept whole); a response that does not fit is an error.
    pub fn encode_pair(&self, pair: &PromptResponse, max_len: usize) -> Result<LmExample, TrainError> {
        let mut prompt = self.encode(&self.format.prompt_text(&pair.prompt))?;
        let mut response = self.encode(&pair.response)?;
        response.push(self.end);
        if response.len() + 8 > max_len {
            return Err(TrainError::Input(format!(
                "example {}: the response has {} tokens, too long for max_len {max_len}",
                pair.id,
                response.len()
            )));
        }
        if prompt.len() + response.len() > max_len {
            // Drop the middle of the prompt: its head (system turn) and tail (the question's end
            // and the assistant's turn) stay.
            let keep = max_len - response.len();
            let (head, tail) = (keep / 4, keep - keep / 4);
            let cut = prompt.len() - tail;
            prompt.drain(head..cut);
        }
        let prompt_len = prompt.len();
        prompt.extend(response);
        Ok(LmExample { id: pair.id, ids: prompt, prompt_len, response: pair.response.clone(), answer: pair.answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_templates_are_recognised_with_their_system_prompt() {
        let smollm = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a \
                      helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}";
        let f = ChatFormat::from_template(Some(smollm));
        assert_eq!(
            f,
            ChatFormat::ChatMl {
                system: Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face".into())
            }
        );
        assert!(f.prompt_text("hi").ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
        let escaped = "{{ '<|im_start|>system\\nBe brief.<|im_end|>' }}";
        assert_eq!(ChatFormat::from_template(Some(escaped)), ChatFormat::ChatMl { system: Some("Be brief.".into()) });
        let variable = "{{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>' }}";
        assert_eq!(ChatFormat::from_template(Some(variable)), ChatFormat::ChatMl { system: None });
        assert_eq!(ChatFormat::from_template(Some("{{ bos_token }}")), ChatFormat::Plain);
        assert_eq!(ChatFormat::from_template(None), ChatFormat::Plain);
    }
}
