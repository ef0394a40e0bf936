// numerics="ggml", attention part 1 of 3 (llama.cpp without flash attention, f16 KV cache;
// ggml_numerics.attention): kq = dot(f16(q), k) in ggml's lane order, times scale, for query
// head h of token t and one key j <= pos0 + t (LANES 64: ggml_vec_dot_f16, decode; 16:
// tinyBLAS, batches: element i goes to lane i % LANES in order, then the lanes by halving).
// q: qkv rows at t * q_stride (head h at h * HD), rotated and f16 (ggml_rope_kv);
// cache: (2, n_kv, ctx, HD).
// Writes scores[(t * n_heads + h) * n_keys + j]. One invocation per (token, head, key): all in
// parallel, with constant loop bounds (HD, LANES) so the lanes stay in registers.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n_tokens * n_heads * n_keys / 64).

override LANES: u32 = 64u;
override HD: u32 = 64u;

struct Params { n_tokens: u32, n_heads: u32, n_kv_heads: u32, pos0: u32, ctx: u32, q_stride: u32,
                n_keys: u32, scale: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wg.x + wg.y * nwg.x) * 64u + lid;
  if (i >= p.n_tokens * p.n_heads * p.n_keys) { return; }
  let j = i % p.n_keys;
  let th = i / p.n_keys;
  let t = th / p.n_heads;
  if (j > p.pos0 + t) { return; }  // a future key: masked
  let h = th % p.n_heads;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let qb = t * p.q_stride + h * HD;
  let kb = (kvh * p.ctx + j) * HD;
  var lanes: array<f32, 64>;  // LANES of them used (a private array cannot take an override size)
  for (var l = 0u; l < LANES; l++) { lanes[l] = 0.0; }
  for (var d0 = 0u; d0 < HD; d0 += LANES) {
    for (var l = 0u; l < LANES; l++) {
      if (d0 + l < HD) { lanes[l] = lanes[l] + qkv[qb + d0 + l] * cache[kb + d0 + l]; }
    }
  }
  for (var n = LANES / 2u; n > 0u; n = n / 2u) {
    for (var l = 0u; l < n; l++) { lanes[l] = lanes[l] + lanes[l + n]; }
  }
  scores[i] = lanes[0] * p.scale;
}
