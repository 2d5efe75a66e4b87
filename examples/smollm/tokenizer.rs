//! The GGUF's own tokenizer: GPT-2 byte-level BPE from `tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges`, pre-tokenized as the `smollm` pre-tokenizer (and SmolLM2's Hugging
//! Face `tokenizer.json`) does — every digit its own piece, then GPT-2's byte-level split — with
//! the control tokens (`<|im_start|>`, `<|im_end|>`, …) matched whole; and the ChatML template.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer};

use crate::AnyResult;

/// The chat template's end-of-turn token.
pub const END_OF_TURN: &str = "<|im_end|>";

pub struct ChatTokenizer {
    inner: Tokenizer,
    /// `<|im_end|>`'s id.
    pub end_of_turn: u32,
}

fn strings(metadata: &HashMap<String, Value>, key: &str) -> AnyResult<Vec<String>> {
    metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata lacks `{key}`"))?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

/// `user` turn `text`, then the assistant's turn opened: SmolLM2's ChatML template with no system
/// turn.
pub fn chat_prompt(text: &str) -> String {
    format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
}

impl ChatTokenizer {
    pub fn from_metadata(metadata: &HashMap<String, Value>) -> AnyResult<Self> {
        let model = metadata
            .get("tokenizer.ggml.model")
            .ok_or("GGUF metadata lacks `tokenizer.ggml.model`")?
            .to_string()?;
        if model != "gpt2" {
            return Err(format!("tokenizer model `{model}`: only byte-level BPE (gpt2)").into());
        }
        let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
        let merges = strings(metadata, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| format!("merge `{m}` is not two tokens"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| format!("BPE: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let pre: Vec<PreTokenizerWrapper> = vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ];
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        ))));
        // Control tokens (GGUF token type 3) are matched whole in the text, never split.
        let types = metadata
            .get("tokenizer.ggml.token_type")
            .ok_or("GGUF metadata lacks `tokenizer.ggml.token_type`")?
            .to_vec()?;
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(ty, _)| matches!(ty.to_i32(), Ok(3)))
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| format!("control tokens: {e}"))?;
        let end_of_turn = inner
            .token_to_id(END_OF_TURN)
            .ok_or("the vocabulary has no <|im_end|>")?;
        Ok(Self { inner, end_of_turn })
    }

    /// Token ids of `text` (control tokens recognised; no BOS is added).
    pub fn encode(&self, text: &str) -> AnyResult<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| format!("encode: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`; control tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> AnyResult<String> {
        Ok(self
            .inner
            .decode(ids, skip_special)
            .map_err(|e| format!("decode: {e}"))?)
    }
}
