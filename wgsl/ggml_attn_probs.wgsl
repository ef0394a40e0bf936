// numerics="ggml", attention part 1 (llama.cpp without flash attention, f16 KV cache;
// ggml_numerics.attention): for query head h of token t (position pos0 + t) over keys
// 0 .. pos0 + t: kq = dot(f16(q), k) in ggml's lane order (LANES 64: ggml_vec_dot_f16, decode;
// 16: tinyBLAS, batches), times scale; softmax as ggml_vec_soft_max_f32 (v_expf(s - max),
// the sum per 16 keys by halving, those sums added in double in order, e * (float)(1 / sum));
// the probabilities rounded to f16 into probs[(t * n_heads + h) * n_keys + key].
// q: qkv rows at t * q_stride (head h at h * head_dim), rotated; cache: (2, n_kv, ctx, hd).
// One invocation per (token, head). Grid: (ceil(n_tokens * n_heads / 64), 1, 1).

//!include ggml_lib

override LANES: u32 = 64u;

struct Params { n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32, pos0: u32,
                ctx: u32, q_stride: u32, n_keys: u32, scale: f32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> probs: array<f32>;

fn halving(v: ptr<function, array<f32, 64>>, n0: u32) -> f32 {
  var n = n0;
  while (n > 1u) {
    n = n / 2u;
    for (var i = 0u; i < n; i++) { (*v)[i] = (*v)[i] + (*v)[i + n]; }
  }
  return (*v)[0];
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= p.n_tokens * p.n_heads) { return; }
  let t = gid.x / p.n_heads;
  let h = gid.x % p.n_heads;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let hd = p.head_dim;
  let n_valid = p.pos0 + t + 1u;
  let out = gid.x * p.n_keys;
  var q: array<f32, 256>;
  for (var d = 0u; d < hd; d++) { q[d] = f16r(qkv[t * p.q_stride + h * hd + d]); }
  var lanes: array<f32, 64>;
  var mx = 0.0;
  for (var j = 0u; j < n_valid; j++) {
    for (var l = 0u; l < LANES; l++) { lanes[l] = 0.0; }
    let kb = (kvh * p.ctx + j) * hd;
    for (var d = 0u; d < hd; d++) { lanes[d % LANES] = lanes[d % LANES] + q[d] * cache[kb + d]; }
    let s = halving(&lanes, LANES) * p.scale;
    probs[out + j] = s;
    if (j == 0u || s > mx) { mx = s; }
  }
  var total = vec2<f32>(0.0, 0.0);
  for (var c = 0u; c < n_valid; c += 16u) {
    for (var l = 0u; l < 16u; l++) {
      var e = 0.0;
      if (c + l < n_valid) {
        e = v_expf(probs[out + c + l] - mx).x;
        probs[out + c + l] = e;
      }
      lanes[l] = e;
    }
    total = dd_add(total, halving(&lanes, 16u));
  }
  let inv = dd_div_to_f32(1.0, total);
  for (var j = 0u; j < n_valid; j++) { probs[out + j] = f16r(probs[out + j] * inv); }
}
