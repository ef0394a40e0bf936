// numerics="ggml", attention part 3 of 3: out[t, h, d] = sum over keys of p16[key] * v[key, d]
// in ggml's lane order (key j to lane j % LANES in key order, then the lanes by halving;
// LANES 64 in decode, 16 in batches), p16 from ggml_attn_softmax.
// out rows at t * (n_heads * head_dim). One invocation per (token, head, dimension).
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n_tokens * n_heads * head_dim / 64).

override LANES: u32 = 64u;

struct Params { n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32, pos0: u32,
                ctx: u32, n_keys: u32, v_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> probs: array<f32>;
@group(0) @binding(2) var<storage, read> cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let hd = p.head_dim;
  let i = (wg.x + wg.y * nwg.x) * 64u + lid;
  if (i >= p.n_tokens * p.n_heads * hd) { return; }
  let d = i % hd;
  let th = i / hd;  // t * n_heads + h
  let t = th / p.n_heads;
  let h = th % p.n_heads;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let n_valid = p.pos0 + t + 1u;
  var lanes: array<f32, 64>;  // LANES of them used (a private array cannot take an override size)
  for (var l = 0u; l < LANES; l++) { lanes[l] = 0.0; }
  let vb = p.v_off + kvh * p.ctx * hd + d;
  let pb = th * p.n_keys;
  for (var j0 = 0u; j0 < n_valid; j0 += LANES) {
    let m = min(LANES, n_valid - j0);
    for (var l = 0u; l < m; l++) { lanes[l] = lanes[l] + probs[pb + j0 + l] * cache[vb + (j0 + l) * hd]; }
  }
  for (var n = LANES / 2u; n > 0u; n = n / 2u) {
    for (var l = 0u; l < n; l++) { lanes[l] = lanes[l] + lanes[l + n]; }
  }
  out[i] = lanes[0];
}
