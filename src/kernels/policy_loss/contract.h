// Generated from `src/kernels/policy_loss/contract.rs` by its test `generated_headers_are_current`
// (`SAPO_REGENERATE=1 cargo test --lib generated_headers`): do not edit.
#pragma once

struct AggregationParams {
  int batch;                   // SAPO_BATCH_*: the batch count.
  int row;                     // SAPO_ROW_*: the row divisor.
  float world;                 // The data-parallel world size.
  float global;                // The global count replacing the local one; < 0: none.
  float row_constant;          // A fixed row divisor (the horizon).
};

struct PolicyParams {
  int rows;                    // Rows.
  int t;                       // Tokens per row.
  int threads;                 // Threads per block.
  int level;                   // SAPO_LEVEL_*.
  int shape;                   // SAPO_OBJECTIVE_*.
  int shape_flag;              // The objective's switch (soft gate: SAPO_GATE_*; hard clip: dual clip; DPPO: binary KL).
  int per_token_advantages;    // Advantages `[B,T]` (else `[B]`).
  int has_weights;             // Rollout weights given.
  int has_reference;           // Reference log-probs given.
  int has_flags;               // Per-token flags given (KL-Cov).
  int kl;                      // A KL penalty.
  int kl_estimator;            // SAPO_KL_*.
  int kl_importance;           // The KL term weighted by the ratio.
  int slots[4];                // The metric slot of each objective metric, −1: none.
  float clamp;                 // The log-ratio clamp c (+inf: none).
  float seq_max;               // The sequence log-ratio bound (+inf: none).
  float kl_coef;               // β.
  float kl_bounds[2];          // k3's log-ratio and value bounds (+inf: unclamped).
  float shape_param[8];        // The objective's parameters.
  AggregationParams policy_aggregation; // The policy term's aggregation.
  AggregationParams kl_aggregation; // The KL term's aggregation.
};

#define SAPO_MAX_EXP_ARG 88.0f
#define SAPO_NUM_SLOTS 16
#define SLOT_TOKENS 0
#define SLOT_NEG_LOG_RATIO 1
#define SLOT_RATIO_EXCESS 2
#define SLOT_KL 9
#define SLOT_KL_LOSS 14
#define ROW_STATS 4
#define ROW_P 0
#define ROW_K 1
#define ROW_CP 2
#define ROW_CK 3
#define ROW_KA 4
#define ROW_SUMS 5
#define ROW_MIN 21
#define ROW_MAX 22
#define ROW_BAD 23
#define ROW_LEN 28
#define OUT_LEN 25
#define CHECKS 6
#define SAPO_LEVEL_TOKEN 0
#define SAPO_LEVEL_SEQUENCE 1
#define SAPO_LEVEL_SEQUENCE_TOKEN 2
#define SAPO_KL_K1 0
#define SAPO_KL_ABS 1
#define SAPO_KL_K2 2
#define SAPO_KL_K3 3
#define SAPO_KL_K3PLUS 4
#define SAPO_BATCH_ONE 0
#define SAPO_BATCH_TOKENS 1
#define SAPO_BATCH_SEQUENCES 2
#define SAPO_BATCH_ROWS 3
#define SAPO_ROW_ONE 0
#define SAPO_ROW_TOKENS 1
#define SAPO_ROW_CONSTANT 2
#define SAPO_GATE_SIGMOID 0
#define SAPO_GATE_ERF 1
#define SAPO_GATE_ARCTAN 2
#define SAPO_GATE_SOFTSIGN 3
#define SAPO_OBJECTIVE_SOFT_GATE 0
#define SAPO_OBJECTIVE_CLIP 1
#define SAPO_OBJECTIVE_UNCLIPPED 2
#define SAPO_OBJECTIVE_POLICY_GRADIENT 3
#define SAPO_OBJECTIVE_CISPO 4
#define SAPO_OBJECTIVE_DRO 5
#define SAPO_OBJECTIVE_KL_COV 6
#define SAPO_OBJECTIVE_DPPO 7
#define SAPO_OBJECTIVE_VESPO 8
#define SAPO_OBJECTIVE_GMPO 9
#define SAPO_OBJECTIVE_TOPR 10
#define SAPO_OBJECTIVE_CLIP_COV 11
#define SAPO_OBJECTIVE_GATE_FAMILY 12
