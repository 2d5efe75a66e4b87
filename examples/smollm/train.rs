//! The RL loop a user writes around `sapo`: sample groups of completions with a KV cache, reward
//! them, group advantages, old log-probs from the hidden states through the tied lm_head (the
//! crate's fused path), then minibatch AdamW updates with `PolicyLoss::forward_from_hidden`,
//! gradient clipping and an optional KL penalty to the frozen start model.
//!
//! With `train_blocks = K` below the model's depth, only the top K blocks and the final norm
//! train: the blocks below are constants, so their outputs (the top blocks' input, captured while
//! sampling) are computed once per rollout and never recorded in a graph.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use sapo::{AdvantageEstimator, Groups, LmHead, PolicyInputs, PolicyLoss};

use crate::digits_task::Rng;
use crate::model::{KvCache, Llama};
use crate::objective::Objective;
use crate::task::Problem;
use crate::tokenizer::{chat_prompt, ChatTokenizer};
use crate::AnyResult;

/// One run's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub group_size: usize,
    pub updates_per_batch: usize,
    pub lr: f64,
    pub temperature: f64,
    pub max_new_tokens: usize,
    /// Trainable top blocks; the model's depth trains every block and the (tied) embedding.
    pub train_blocks: usize,
    pub kl_coef: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
}

/// The policy being trained: the model (its trainable weights are `Var`s) and those variables.
pub struct Policy {
    pub model: Llama,
    pub vars: Vec<(String, Var)>,
    /// The first trainable block.
    pub split: usize,
    /// Whether the embedding (the tied lm_head) trains: then updates run from the token ids.
    pub embedding_trains: bool,
}

impl Policy {
    pub fn new(mut model: Llama, train_blocks: usize) -> AnyResult<Self> {
        let layers = model.blocks.len();
        if train_blocks == 0 || train_blocks > layers {
            return Err(format!("--train-layers {train_blocks}: want 1..={layers}").into());
        }
        let embedding_trains = train_blocks == layers;
        let vars = model.make_trainable(train_blocks, embedding_trains)?;
        Ok(Self {
            model,
            vars,
            split: layers - train_blocks,
            embedding_trains,
        })
    }

    /// Final hidden states of the completion positions `[N, L, H]` from a rollout's inputs.
    fn completion_hidden(
        &self,
        model: &Llama,
        inputs: &Tensor,
        prompt_len: usize,
        completion_len: usize,
    ) -> candle_core::Result<Tensor> {
        let hidden = if self.embedding_trains {
            model.hidden_states(inputs)?
        } else {
            model.top(inputs, self.split)?
        };
        hidden.narrow(1, prompt_len - 1, completion_len)
    }
}

/// Sampled completions of one batch of equally long prompts.
pub struct Samples {
    /// Per row, the sampled tokens (ending with `<|im_end|>` when the model ended its turn).
    pub completions: Vec<Vec<u32>>,
    /// The input of block `split` at every input position (prompt and completion but its last
    /// token), `[N, prompt + L − 1, H]`, when asked for.
    pub boundary: Option<Tensor>,
}

/// Samples `group` completions of each prompt (all `prompts` equally long) at `temperature`
/// (0: greedy), at most `max_new` tokens each, with a KV cache; each prompt runs once and its
/// cache is repeated for its group.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    temperature: f64,
    max_new: usize,
    end_of_turn: u32,
    split: Option<usize>,
    rng: &mut Rng,
) -> AnyResult<Samples> {
    let device = model.embed.device();
    let prompt_len = prompts[0].len();
    if prompts.iter().any(|p| p.len() != prompt_len) {
        return Err("the prompts of one batch must have the same number of tokens".into());
    }
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    let ids = Tensor::from_vec(flat, (prompts.len(), prompt_len), device)?;
    let layers = model.blocks.len();
    let split_at = split.unwrap_or(layers);
    let mut cache = KvCache::new(layers);
    let (prompt_boundary, last) = model.extend(&ids, &mut cache, split_at)?;
    let rows: Vec<u32> = (0..prompts.len() as u32)
        .flat_map(|p| std::iter::repeat_n(p, group))
        .collect();
    let rows = Tensor::new(rows.as_slice(), device)?;
    let mut cache = cache.select_rows(&rows)?;
    let mut last = last.index_select(&rows, 0)?;
    let n = prompts.len() * group;
    let mut boundaries = vec![prompt_boundary.index_select(&rows, 0)?];
    let mut completions = vec![Vec::new(); n];
    let mut done = vec![false; n];
    for step in 0..max_new {
        let logits = model
            .logits(&last)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(n);
        for (i, row) in logits.iter().enumerate() {
            let token = if done[i] {
                end_of_turn
            } else if temperature == 0.0 {
                argmax(row)
            } else {
                rng.categorical(row, temperature)
            };
            if !done[i] {
                completions[i].push(token);
                done[i] = token == end_of_turn;
            }
            next.push(token);
        }
        if step + 1 == max_new || done.iter().all(|d| *d) {
            break;
        }
        let ids = Tensor::from_vec(next, (n, 1), device)?;
        let (boundary, hidden) = model.extend(&ids, &mut cache, split_at)?;
        if split.is_some() {
            boundaries.push(boundary);
        }
        last = hidden;
    }
    let boundary = match split {
        Some(_) => Some(Tensor::cat(&boundaries, 1)?),
        None => None,
    };
    Ok(Samples {
        completions,
        boundary,
    })
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Accuracy and mean completion length (tokens) on `problems`, one completion each.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation {
    pub accuracy: f64,
    pub mean_length: f64,
}

/// Evaluates `model` on `problems` in batches of `batch` (equally long prompts per batch).
pub fn evaluate(
    model: &Llama,
    tokenizer: &ChatTokenizer,
    problems: &[Problem],
    temperature: f64,
    max_new: usize,
    batch: usize,
    rng: &mut Rng,
) -> AnyResult<Evaluation> {
    let model = model.detached();
    let mut by_len: HashMap<usize, Vec<(Problem, Vec<u32>)>> = HashMap::new();
    for p in problems {
        let ids = tokenizer.encode(&chat_prompt(&p.question()))?;
        by_len.entry(ids.len()).or_default().push((*p, ids));
    }
    let mut lens: Vec<usize> = by_len.keys().copied().collect();
    lens.sort();
    let (mut correct, mut length) = (0.0, 0usize);
    for len in lens {
        for chunk in by_len[&len].chunks(batch.max(1)) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
            let s = sample(
                &model,
                &prompts,
                1,
                temperature,
                max_new,
                tokenizer.end_of_turn,
                None,
                rng,
            )?;
            for ((p, _), completion) in chunk.iter().zip(&s.completions) {
                correct += p.reward(&tokenizer.decode(completion, true)?);
                length += completion.len();
            }
        }
    }
    Ok(Evaluation {
        accuracy: correct / problems.len() as f64,
        mean_length: length as f64 / problems.len() as f64,
    })
}

/// One RL step's record.
#[derive(Debug, Clone)]
pub struct Row {
    pub step: usize,
    pub objective: &'static str,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub completion_length: f64,
    pub ended_share: f64,
    pub approx_kl: f64,
    pub clip_fraction: Option<f64>,
    pub gate_weight_mean: Option<f64>,
    pub entropy: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub seconds_sampling: f64,
    pub seconds_old_log_probs: f64,
    pub seconds_updates: f64,
    pub seconds: f64,
}

pub const CSV_HEADER: &str = "step,objective,reward_mean,reward_std,completion_length,ended_share,approx_kl,clip_fraction,gate_weight_mean,entropy,loss,grad_norm,seconds_sampling,seconds_old_log_probs,seconds_updates,seconds";

impl Row {
    pub fn csv(&self) -> String {
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
        format!(
            "{},{},{:.6},{:.6},{:.3},{:.4},{:.6},{},{},{:.6},{:.6},{:.4},{:.3},{:.3},{:.3},{:.3}",
            self.step,
            self.objective,
            self.reward_mean,
            self.reward_std,
            self.completion_length,
            self.ended_share,
            self.approx_kl,
            opt(self.clip_fraction),
            opt(self.gate_weight_mean),
            self.entropy,
            self.loss,
            self.grad_norm,
            self.seconds_sampling,
            self.seconds_old_log_probs,
            self.seconds_updates,
            self.seconds
        )
    }
}

impl Row {
    /// Reads one line that [`Row::csv`] wrote (the objective's name must be known, which gives
    /// back its `'static` name); `None` for the header or a malformed line.
    pub fn parse(line: &str) -> Option<Row> {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != CSV_HEADER.split(',').count() {
            return None;
        }
        let number = |i: usize| fields[i].parse::<f64>().ok();
        let optional = |i: usize| match fields[i] {
            "" => Some(None),
            text => text.parse::<f64>().ok().map(Some),
        };
        Some(Row {
            step: fields[0].parse().ok()?,
            objective: crate::objective::Objective::from_name(fields[1])?.name(),
            reward_mean: number(2)?,
            reward_std: number(3)?,
            completion_length: number(4)?,
            ended_share: number(5)?,
            approx_kl: number(6)?,
            clip_fraction: optional(7)?,
            gate_weight_mean: optional(8)?,
            entropy: number(9)?,
            loss: number(10)?,
            grad_norm: number(11)?,
            seconds_sampling: number(12)?,
            seconds_old_log_probs: number(13)?,
            seconds_updates: number(14)?,
            seconds: number(15)?,
        })
    }
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// A rollout ready for the updates: inputs, targets, mask, advantages, old and reference
/// log-probs, all `[N, …]`.
struct Batch {
    prompt_len: usize,
    completion_len: usize,
    inputs: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_log_probs: Tensor,
    ref_log_probs: Option<Tensor>,
    entropy_mean: f64,
    rewards: Vec<f64>,
    lengths: Vec<usize>,
    /// Completions that ended their turn within the token budget.
    ended: usize,
}

/// Clips the gradients of `vars` to a global norm of `max_norm`; returns the norm before.
fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[(String, Var)],
    max_norm: f64,
) -> AnyResult<f64> {
    let mut sum = 0.0;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sum.sqrt();
    if norm > max_norm && max_norm > 0.0 {
        let scale = max_norm / norm;
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// The trainer: the policy, its optimizer, the frozen start model (for the KL penalty).
pub struct Trainer<'a> {
    pub policy: Policy,
    reference: Option<Llama>,
    optimizer: AdamW,
    loss: PolicyLoss,
    objective: Objective,
    tokenizer: &'a ChatTokenizer,
    settings: Settings,
    rng: Rng,
    started: Instant,
    step: usize,
    reward: Reward,
}

/// A completion's reward: the problem and the completion's text (control tokens removed).
pub type Reward = fn(&Problem, &str) -> f64;

impl<'a> Trainer<'a> {
    pub fn new(
        model: Llama,
        tokenizer: &'a ChatTokenizer,
        objective: Objective,
        settings: Settings,
    ) -> AnyResult<Self> {
        let reference = (settings.kl_coef > 0.0)
            .then(|| model.deep_copy())
            .transpose()?;
        let policy = Policy::new(model, settings.train_blocks)?;
        let optimizer = AdamW::new(
            policy.vars.iter().map(|(_, v)| v.clone()).collect(),
            ParamsAdamW {
                lr: settings.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let loss = objective.loss(sapo::Sapo::default(), settings.kl_coef)?;
        Ok(Self {
            policy,
            reference,
            optimizer,
            loss,
            objective,
            tokenizer,
            rng: Rng::new(settings.seed.wrapping_add(1)),
            settings,
            started: Instant::now(),
            step: 0,
            reward: Problem::reward,
        })
    }

    /// Replaces the task's reward ([`Problem::reward`]).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn with_reward(mut self, reward: Reward) -> Self {
        self.reward = reward;
        self
    }

    /// Old (and reference) log-probs of a rollout: the current policy without a graph.
    fn log_probs_of(
        &self,
        model: &Llama,
        inputs: &Tensor,
        targets: &Tensor,
        prompt_len: usize,
    ) -> AnyResult<(Tensor, Tensor)> {
        let model = model.detached();
        let hidden = self
            .policy
            .completion_hidden(&model, inputs, prompt_len, targets.dim(1)?)?;
        Ok(sapo::linear_log_probs_and_entropy(
            &hidden,
            model.lm_head(),
            None,
            targets,
            self.settings.temperature,
        )?)
    }

    /// Rewards, advantages, targets, mask and old (and reference) log-probs of sampled
    /// completions.
    fn batch(
        &self,
        problems: &[Problem],
        prompts: &[Vec<u32>],
        samples: Samples,
        device: &Device,
    ) -> AnyResult<Batch> {
        let s = &self.settings;
        let end = self.tokenizer.end_of_turn;
        let prompt_len = prompts[0].len();
        let completions = &samples.completions;
        let n = completions.len();
        let width = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut rewards = Vec::with_capacity(n);
        for (i, c) in completions.iter().enumerate() {
            let problem = problems[i / s.group_size];
            rewards.push((self.reward)(&problem, &self.tokenizer.decode(c, true)?));
        }
        let lengths: Vec<usize> = completions.iter().map(Vec::len).collect();
        let ended = completions
            .iter()
            .filter(|c| c.last() == Some(&end))
            .count();
        let padded = |c: &Vec<u32>, len: usize| {
            let mut row = c.clone();
            row.resize(len, end);
            row.truncate(len);
            row
        };
        let targets: Vec<u32> = completions.iter().flat_map(|c| padded(c, width)).collect();
        let targets = Tensor::from_vec(targets, (n, width), device)?;
        let mask: Vec<u8> = lengths
            .iter()
            .flat_map(|&len| (0..width).map(move |j| (j < len) as u8))
            .collect();
        let mask = Tensor::from_vec(mask, (n, width), device)?;
        let inputs = match samples.boundary {
            Some(b) => b,
            None => {
                let ids: Vec<u32> = completions
                    .iter()
                    .enumerate()
                    .flat_map(|(i, c)| {
                        let mut row = prompts[i / s.group_size].clone();
                        row.extend(padded(c, width - 1));
                        row
                    })
                    .collect();
                Tensor::from_vec(ids, (n, prompt_len + width - 1), device)?
            }
        };
        let reward_tensor = Tensor::new(rewards.as_slice(), device)?.to_dtype(DType::F32)?;
        let advantages = sapo::group_advantages(
            &reward_tensor,
            Groups::Size(s.group_size),
            AdvantageEstimator::Grpo { epsilon: 1e-6 },
        )?;
        let (old_log_probs, entropy) =
            self.log_probs_of(&self.policy.model, &inputs, &targets, prompt_len)?;
        let ref_log_probs = match &self.reference {
            Some(r) => Some(self.log_probs_of(r, &inputs, &targets, prompt_len)?.0),
            None => None,
        };
        let maskf = mask.to_dtype(DType::F32)?;
        let entropy_mean = ((entropy * &maskf)?.sum_all()?.to_scalar::<f32>()?
            / maskf.sum_all()?.to_scalar::<f32>()?) as f64;
        Ok(Batch {
            prompt_len,
            completion_len: width,
            inputs,
            targets,
            mask,
            advantages,
            old_log_probs,
            ref_log_probs,
            entropy_mean,
            rewards,
            lengths,
            ended,
        })
    }

    /// One RL step on `problems` (the step's prompts, `settings.prompts` of them).
    pub fn step(&mut self, problems: &[Problem]) -> AnyResult<Row> {
        let s = self.settings.clone();
        let device = self.policy.model.embed.device().clone();
        let t0 = Instant::now();
        let prompts = problems
            .iter()
            .map(|p| self.tokenizer.encode(&chat_prompt(&p.question())))
            .collect::<AnyResult<Vec<_>>>()?;
        debug_assert!(prompts.iter().all(|p| p.len() == prompts[0].len()));
        let sampler = self.policy.model.detached();
        let samples = sample(
            &sampler,
            &prompts,
            s.group_size,
            s.temperature,
            s.max_new_tokens,
            self.tokenizer.end_of_turn,
            (!self.policy.embedding_trains).then_some(self.policy.split),
            &mut self.rng,
        )?;
        let seconds_sampling = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let batch = self.batch(problems, &prompts, samples, &device)?;
        let seconds_old = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        let n = batch.targets.dim(0)?;
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            order.swap(i, self.rng.below(i + 1));
        }
        let per_update = n.div_ceil(s.updates_per_batch);
        let mut metrics: Option<sapo::PolicyMetrics> = None;
        let (mut loss_sum, mut norm_sum, mut updates) = (0.0, 0.0, 0);
        for chunk in order.chunks(per_update) {
            let idx = Tensor::new(chunk, &device)?;
            let pick = |t: &Tensor| t.index_select(&idx, 0);
            let hidden = self.policy.completion_hidden(
                &self.policy.model,
                &pick(&batch.inputs)?,
                batch.prompt_len,
                batch.completion_len,
            )?;
            let targets = pick(&batch.targets)?;
            let head = LmHead::new(&hidden, self.policy.model.lm_head(), &targets)
                .with_temperature(s.temperature);
            let (old, adv, mask) = (
                pick(&batch.old_log_probs)?,
                pick(&batch.advantages)?,
                pick(&batch.mask)?,
            );
            let reference = batch.ref_log_probs.as_ref().map(pick).transpose()?;
            let mut inputs = PolicyInputs::new(head, &old, &adv, &mask);
            if let Some(r) = &reference {
                inputs = inputs.with_ref_log_probs(r);
            }
            let output = self.loss.forward_from_hidden(&inputs)?;
            let mut grads = output.loss.backward()?;
            norm_sum += clip_gradients(&mut grads, &self.policy.vars, s.max_grad_norm)?;
            self.optimizer.step(&grads)?;
            loss_sum += output.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            updates += 1;
            metrics = Some(match metrics {
                None => output.metrics,
                Some(prev) => prev.merge(&output.metrics)?,
            });
        }
        let seconds_updates = t2.elapsed().as_secs_f64();
        let m = metrics.ok_or("no update")?.read()?;
        let (reward_mean, reward_std) = mean_std(&batch.rewards);
        let row = Row {
            step: self.step,
            objective: self.objective.name(),
            reward_mean,
            reward_std,
            completion_length: batch.lengths.iter().sum::<usize>() as f64 / n as f64,
            ended_share: batch.ended as f64 / n as f64,
            approx_kl: m.approx_kl().unwrap_or(0.0),
            clip_fraction: m.clip_fraction(),
            gate_weight_mean: m.gate_weight_mean(),
            entropy: batch.entropy_mean,
            loss: loss_sum / updates as f64,
            grad_norm: norm_sum / updates as f64,
            seconds_sampling,
            seconds_old_log_probs: seconds_old,
            seconds_updates,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        self.step += 1;
        Ok(row)
    }
}
