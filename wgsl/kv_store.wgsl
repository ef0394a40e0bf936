// Append the K/V heads of n_tokens new tokens to the KV cache.
// src: n_tokens rows of src_stride f32, n_heads heads of head_dim starting at src_off.
// cache: [n_heads, ctx, head_dim] f32 from cache_off; token t goes to position pos0 + t.
// With a fused QKV row, src_off = n_q_heads * head_dim and n_heads = 2 * n_kv_heads copies
// K to cache heads [0, n_kv) and V to [n_kv, 2 n_kv) in one dispatch.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n_tokens * n_heads * head_dim / WG).

override WG: u32 = 256u;

struct Params {
  n_tokens: u32, n_heads: u32, head_dim: u32, src_stride: u32,
  src_off: u32, ctx: u32, pos0: u32, cache_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let g = (wg.x + wg.y * nwg.x) * WG + lid;
  if (g >= p.n_tokens * p.n_heads * p.head_dim) { return; }
  let d = g % p.head_dim;
  let h = (g / p.head_dim) % p.n_heads;
  let t = g / (p.head_dim * p.n_heads);
  cache[p.cache_off + (h * p.ctx + p.pos0 + t) * p.head_dim + d] =
      src[t * p.src_stride + p.src_off + h * p.head_dim + d];
}
