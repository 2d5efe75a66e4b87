//! The loader, the differentiable model and the tokenizer, on a tiny random Llama GGUF written
//! here and (when `scripts/fetch-smollm2.sh` has run) on SmolLM2 itself, against
//! candle-transformers' `quantized_llama` (an independent implementation of the same file).

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use sapo::{LmHead, PolicyInputs};

use crate::digits_task::Rng;
use crate::gguf::Gguf;
use crate::model::{KvCache, Llama};
use crate::objective::Objective;
use crate::task::Problem;
use crate::tokenizer::{chat_prompt, ChatTokenizer};
use crate::train::{Policy, Row, Settings, Trainer};

/// GPT-2's byte ↔ character map: printable bytes are themselves, the others `256 + n`.
fn byte_chars() -> Vec<char> {
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// A tiny Llama GGUF: random weights stored as `dtype`, a byte-level BPE vocabulary (every byte,
/// a few merges, `<|im_start|>` and `<|im_end|>` as control tokens).
fn write_tiny_gguf(path: &Path, dtype: GgmlDType, seed: u64) -> candle_core::Result<()> {
    let device = Device::Cpu;
    let (hidden, heads, kv_heads, ff, layers) = (32usize, 4usize, 2usize, 64usize, 2usize);
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "s"),
        ("Ġ", "is"),
    ];
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
    }
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let vocab = tokens.len();
    let token_type: Vec<gguf_file::Value> = (0..vocab)
        .map(|i| gguf_file::Value::I32(if i >= vocab - 2 { 3 } else { 1 }))
        .collect();
    let strings = |v: Vec<String>| {
        gguf_file::Value::Array(v.into_iter().map(gguf_file::Value::String).collect())
    };
    let u32v = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", u32v(layers)),
        ("llama.embedding_length", u32v(hidden)),
        ("llama.feed_forward_length", u32v(ff)),
        ("llama.attention.head_count", u32v(heads)),
        ("llama.attention.head_count_kv", u32v(kv_heads)),
        ("llama.rope.dimension_count", u32v(hidden / heads)),
        ("llama.rope.freq_base", gguf_file::Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
        ("llama.context_length", u32v(64)),
        (
            "tokenizer.ggml.model",
            gguf_file::Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre",
            gguf_file::Value::String("smollm".into()),
        ),
        ("tokenizer.ggml.tokens", strings(tokens)),
        (
            "tokenizer.ggml.merges",
            strings(merges.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            gguf_file::Value::Array(token_type),
        ),
    ];
    let mut rng = Rng::new(seed);
    let mut tensor = |shape: &[usize], norm: bool| -> candle_core::Result<QTensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let x = rng.normal() as f32;
                if norm {
                    1.0 + 0.1 * x
                } else {
                    x / (shape[shape.len() - 1] as f32).sqrt()
                }
            })
            .collect();
        // Norms stay f32, as llama.cpp keeps them.
        let dtype = if norm { GgmlDType::F32 } else { dtype };
        QTensor::quantize(&Tensor::from_vec(values, shape, &device)?, dtype)
    };
    // GGUF dims run innermost first: a `[out, in]` matrix is stored as (in, out).
    let kv = kv_heads * hidden / heads;
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            tensor(&[vocab, hidden], false)?,
        ),
        ("output_norm.weight".to_string(), tensor(&[hidden], true)?),
    ];
    for i in 0..layers {
        for (name, shape, norm) in [
            ("attn_norm", vec![hidden], true),
            ("attn_q", vec![hidden, hidden], false),
            ("attn_k", vec![kv, hidden], false),
            ("attn_v", vec![kv, hidden], false),
            ("attn_output", vec![hidden, hidden], false),
            ("ffn_norm", vec![hidden], true),
            ("ffn_gate", vec![ff, hidden], false),
            ("ffn_up", vec![ff, hidden], false),
            ("ffn_down", vec![hidden, ff], false),
        ] {
            tensors.push((format!("blk.{i}.{name}.weight"), tensor(&shape, norm)?));
        }
    }
    let mut file = std::fs::File::create(path)?;
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors)
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sapo-smollm-{}-{name}", std::process::id()))
}

fn load(path: &Path) -> (Llama, ChatTokenizer) {
    let mut gguf = Gguf::read(path, &Device::Cpu).unwrap();
    let tokenizer = ChatTokenizer::from_metadata(&gguf.metadata).unwrap();
    (
        Llama::from_gguf(&mut gguf, &Device::Cpu).unwrap(),
        tokenizer,
    )
}

/// Each token's log-prob after the first under candle-transformers' quantized Llama, fed one
/// token at a time through its KV cache.
fn reference_log_probs(path: &Path, ids: &[u32]) -> Vec<f32> {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    (0..ids.len() - 1)
        .map(|i| {
            let x = Tensor::new(&[ids[i]], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&x, i).unwrap().squeeze(0).unwrap();
            let log_softmax = candle_nn::ops::log_softmax(&logits, 0).unwrap();
            log_softmax.to_vec1::<f32>().unwrap()[ids[i + 1] as usize]
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// In f32 storage both implementations multiply the same f32 weights; they differ only in the
/// order of float operations (ours runs the whole sequence at once, the reference one token at a
/// time with its cache), so they agree to f32 rounding over two blocks: 1e-4.
#[test]
fn log_probs_match_quantized_llama_on_a_tiny_f32_gguf() {
    let path = temp_path("tiny-f32.gguf");
    write_tiny_gguf(&path, GgmlDType::F32, 7).unwrap();
    let (model, tokenizer) = load(&path);
    let ids = tokenizer.encode(&chat_prompt("the 12 is 345")).unwrap();
    assert_eq!(ids[0] as usize, model.config.vocab - 2);
    let (scored, ours) = crate::score(&model, &tokenizer, &chat_prompt("the 12 is 345")).unwrap();
    assert_eq!(scored, ids);
    let reference = reference_log_probs(&path, &ids);
    let diff = max_abs_diff(&ours, &reference);
    assert!(
        diff < 1e-4,
        "max |Δ log-prob| = {diff}: {ours:?} vs {reference:?}"
    );
    std::fs::remove_file(path).ok();
}

/// How far our f32 log-probs may be from `quantized_llama` on a quantized file. Its CPU matmul
/// quantizes the *activations* to 8 bits per block of 32 (Q8_0/Q8_1, a relative error up to 2⁻⁸
/// per value) before the integer dot products, where we dequantize the weights and multiply in f32;
/// that noise, through every block, moves log-probs by a few hundredths (measured: 0.079 on the
/// tiny Q8_0 file, 0.089 on SmolLM2's 16 prompt tokens). Exactness is checked on f32 files.
const QUANTIZED_TOLERANCE: f32 = 0.15;

/// Writes `src` again with every tensor dequantized to f32.
fn export_f32(src: &Path, dst: &Path) {
    let mut file = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|name| {
            let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let t = q.dequantize(&Device::Cpu).unwrap();
            (name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

/// On a Q8_0 file: within [`QUANTIZED_TOLERANCE`].
#[test]
fn log_probs_match_quantized_llama_on_a_tiny_q8_gguf() {
    let path = temp_path("tiny-q8.gguf");
    write_tiny_gguf(&path, GgmlDType::Q8_0, 11).unwrap();
    let (model, tokenizer) = load(&path);
    let text = chat_prompt("is the 7 + 5 the 12");
    let (ids, ours) = crate::score(&model, &tokenizer, &text).unwrap();
    let reference = reference_log_probs(&path, &ids);
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff < QUANTIZED_TOLERANCE, "max |Δ log-prob| = {diff}");
    std::fs::remove_file(path).ok();
}

#[test]
fn kv_cache_gives_the_full_sequence_hidden_states() {
    let path = temp_path("tiny-cache.gguf");
    write_tiny_gguf(&path, GgmlDType::F32, 3).unwrap();
    let (model, tokenizer) = load(&path);
    let ids = tokenizer.encode("the cat is the 42 cat").unwrap();
    let t = ids.len();
    let all = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = model.hidden_states(&all).unwrap();
    let mut cache = KvCache::new(model.blocks.len());
    let (_, first) = model
        .extend(&all.narrow(1, 0, 4).unwrap(), &mut cache, 1)
        .unwrap();
    let mut lasts = vec![first];
    for i in 4..t {
        let (_, h) = model
            .extend(&all.narrow(1, i, 1).unwrap(), &mut cache, 1)
            .unwrap();
        lasts.push(h);
    }
    for (k, h) in lasts.iter().enumerate() {
        let want = full
            .narrow(1, k + 3, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(max_abs_diff(&want, &got) < 1e-5, "position {}", k + 3);
    }
    std::fs::remove_file(path).ok();
}

/// After one backward of the policy loss, every trainable weight has a non-zero gradient: no op
/// of the model cuts the graph (candle-nn's rms_norm, softmax_last_dim and rotary_emb would).
#[test]
fn every_parameter_gets_a_gradient() {
    let path = temp_path("tiny-grad.gguf");
    write_tiny_gguf(&path, GgmlDType::F32, 5).unwrap();
    let (model, tokenizer) = load(&path);
    for top in [2, 1] {
        let policy = Policy::new(model.clone(), top).unwrap();
        let expected = if top == 2 { 1 + 9 * 2 + 1 } else { 9 + 1 };
        assert_eq!(policy.vars.len(), expected);
        let _ = &tokenizer;
        let mut rng = Rng::new(top as u64);
        let ids: Vec<u32> = (0..12).map(|_| rng.below(256 + 5) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 6), &Device::Cpu).unwrap();
        let t = ids.dim(1).unwrap();
        let inputs = ids.narrow(1, 0, t - 1).unwrap();
        let targets = ids.narrow(1, 1, t - 1).unwrap().contiguous().unwrap();
        let hidden = if policy.embedding_trains {
            policy.model.hidden_states(&inputs).unwrap()
        } else {
            let frozen = policy.model.detached();
            let mut cache = KvCache::new(frozen.blocks.len());
            let x = frozen.extend(&inputs, &mut cache, policy.split).unwrap().0;
            policy.model.top(&x, policy.split).unwrap()
        };
        let (old, _) = sapo::linear_log_probs_and_entropy(
            &hidden.detach(),
            &policy.model.lm_head().detach(),
            None,
            &targets,
            1.0,
        )
        .unwrap();
        // Shift the old log-probs so the ratio is off 1 and every position carries a gradient.
        let old = (old - 0.05).unwrap();
        let advantages = Tensor::new(&[1f32, -0.7], &Device::Cpu).unwrap();
        let mask = Tensor::ones((2, t - 1), candle_core::DType::U8, &Device::Cpu).unwrap();
        let head = LmHead::new(&hidden, policy.model.lm_head(), &targets);
        let loss = Objective::Sapo.loss(sapo::Sapo::default(), 0.0).unwrap();
        let out = loss
            .forward_from_hidden(&PolicyInputs::new(head, &old, &advantages, &mask))
            .unwrap();
        let grads = out.loss.backward().unwrap();
        for (name, var) in &policy.vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm² {norm}"
            );
        }
    }
    std::fs::remove_file(path).ok();
}

#[test]
fn tokenizer_round_trips_and_keeps_control_tokens_whole() {
    let path = temp_path("tiny-tok.gguf");
    write_tiny_gguf(&path, GgmlDType::F32, 1).unwrap();
    let (_, tokenizer) = load(&path);
    for text in [
        "the 123 is\n\n  the",
        "héllo wörld ✓ 😀",
        "",
        " leading and trailing ",
        "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    let ids = tokenizer.encode("<|im_start|>the<|im_end|>").unwrap();
    let vocab = 256 + 5 + 2;
    assert_eq!(ids.first(), Some(&(vocab as u32 - 2)));
    assert_eq!(ids.last(), Some(&(vocab as u32 - 1)));
    assert_eq!(tokenizer.end_of_turn, vocab as u32 - 1);
    // Merges apply; digits stay single.
    assert_eq!(tokenizer.encode(" the").unwrap(), vec![256 + 2]);
    assert_eq!(tokenizer.encode("12").unwrap().len(), 2);
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "the");
    std::fs::remove_file(path).ok();
}

/// Two RL steps of the loop on the tiny model (top block trains, KL on) run and move the weights.
#[test]
fn the_training_loop_runs_and_updates_the_policy() {
    let path = temp_path("tiny-loop.gguf");
    write_tiny_gguf(&path, GgmlDType::F32, 9).unwrap();
    let (model, tokenizer) = load(&path);
    for (objective, top) in [(Objective::Sapo, 1), (Objective::Gspo, 2)] {
        let settings = Settings {
            group_size: 3,
            updates_per_batch: 2,
            lr: 1e-2,
            temperature: 1.0,
            max_new_tokens: 5,
            train_blocks: top,
            kl_coef: 0.01,
            max_grad_norm: 1.0,
            seed: 4,
        };
        // The random model never states a sum: reward the completion's length instead, so that
        // the groups have advantages.
        let mut trainer = Trainer::new(model.clone(), &tokenizer, objective, settings)
            .unwrap()
            .with_reward(|_, completion| completion.chars().count() as f64);
        let before: Vec<Tensor> = trainer
            .policy
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let problems = [Problem { a: 12, b: 30 }, Problem { a: 41, b: 17 }];
        for step in 0..2 {
            let row = trainer.step(&problems).unwrap();
            assert_eq!(row.step, step);
            assert!(row.loss.is_finite() && row.grad_norm.is_finite() && row.grad_norm > 0.0);
            assert!(row.completion_length >= 1.0 && row.completion_length <= 5.0);
            // What --plot reads back is what was written.
            let line = row.csv();
            let parsed = Row::parse(&line).expect("a metrics row parses");
            assert_eq!(parsed.csv(), line);
            assert!(Row::parse(crate::train::CSV_HEADER).is_none());
        }
        let moved = trainer
            .policy
            .vars
            .iter()
            .zip(&before)
            .filter(|((_, v), b)| {
                let d = (v.as_tensor() - *b).unwrap().abs().unwrap();
                d.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
            })
            .count();
        assert_eq!(moved, trainer.policy.vars.len(), "{}", objective.name());
    }
    std::fs::remove_file(path).ok();
}

/// The real model, when present: the ids of a fixed chat prompt and their log-probs against
/// `quantized_llama` on the same file.
#[test]
fn smollm2_matches_quantized_llama() {
    let path = std::env::var_os("SAPO_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(crate::DEFAULT_MODEL));
    if !path.exists() {
        println!(
            "NOT RUN: smollm2_matches_quantized_llama needs {} (scripts/fetch-smollm2.sh)",
            path.display()
        );
        return;
    }
    let (model, tokenizer) = load(&path);
    assert_eq!(model.config.vocab, 49152);
    assert_eq!(model.blocks.len(), 30);
    assert!(model.output.is_none(), "SmolLM2's lm_head is tied");
    let text = chat_prompt("What is 7 + 5?");
    let (ids, ours) = crate::score(&model, &tokenizer, &text).unwrap();
    assert_eq!(ids, SMOLLM2_WHAT_IS_7_PLUS_5);
    let reference = reference_log_probs(&path, &ids);
    let diff = max_abs_diff(&ours, &reference);
    println!(
        "SmolLM2: max |Δ log-prob| vs quantized_llama over {} tokens: {diff}",
        ours.len()
    );
    assert!(
        diff < QUANTIZED_TOLERANCE,
        "max |Δ log-prob| = {diff}: {ours:?} vs {reference:?}"
    );
    // The same weights stored in f32: the reference then multiplies exactly what we do.
    let f32_path = temp_path("smollm2-f32.gguf");
    export_f32(&path, &f32_path);
    let reference = reference_log_probs(&f32_path, &ids);
    std::fs::remove_file(&f32_path).ok();
    let diff = max_abs_diff(&ours, &reference);
    println!("SmolLM2: max |Δ log-prob| vs quantized_llama on its f32 export: {diff}");
    assert!(
        diff < 1e-4,
        "max |Δ log-prob| = {diff}: {ours:?} vs {reference:?}"
    );
    for text in [
        "What is 43 + 20? Reply with only the number.",
        "To add 43 and 20, we follow",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
}

/// `<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n` in SmolLM2's vocabulary.
const SMOLLM2_WHAT_IS_7_PLUS_5: &[u32] = &[
    1, 4093, 198, 1780, 314, 216, 39, 1232, 216, 37, 47, 2, 198, 1, 520, 9531, 198,
];

/// Why `model.rs` writes its own RMSNorm, softmax and RoPE: in candle-nn 0.11 these three run
/// without a backward (`apply_op*_no_bwd`), so no gradient reaches what comes before them. If a
/// later candle gives them a backward, this test fails and `model.rs` may use them again.
#[test]
fn candle_nn_fused_ops_cut_the_graph() {
    let device = Device::Cpu;
    let x = candle_core::Var::randn(0f32, 1.0, (1, 1, 4, 8), &device).unwrap();
    let w = Tensor::ones(8, candle_core::DType::F32, &device).unwrap();
    let cos = Tensor::ones((4, 4), candle_core::DType::F32, &device).unwrap();
    let sin = Tensor::zeros((4, 4), candle_core::DType::F32, &device).unwrap();
    let cut = [
        candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap(),
        candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap(),
        candle_nn::rotary_emb::rope_i(x.as_tensor(), &cos, &sin).unwrap(),
    ];
    for y in cut {
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_none());
    }
    // Ours keep it.
    let kept = [
        crate::model::rms_norm(x.as_tensor(), &w, 1e-5).unwrap(),
        crate::model::softmax_last(x.as_tensor()).unwrap(),
        crate::model::rope_interleaved(x.as_tensor(), &cos, &sin).unwrap(),
    ];
    for y in kept {
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }
}

/// Our RoPE, RMSNorm and softmax against candle-nn's (forward values).
#[test]
fn model_ops_match_candle_nn_forward() {
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &device).unwrap();
    let w = Tensor::randn(1f32, 0.1, 8, &device).unwrap();
    let angles = Tensor::randn(0f32, 2.0, (5, 4), &device).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let pairs = [
        (
            crate::model::rms_norm(&x, &w, 1e-5).unwrap(),
            candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap(),
        ),
        (
            crate::model::softmax_last(&x).unwrap(),
            candle_nn::ops::softmax_last_dim(&x).unwrap(),
        ),
        (
            crate::model::rope_interleaved(&x, &cos, &sin).unwrap(),
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap(),
        ),
    ];
    for (ours, theirs) in pairs {
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-5);
    }
}
