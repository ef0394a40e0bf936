// Fused decode/prefill step after the QKV matvec: RoPE on Q (in place) and K, and K, V
// appended to the KV cache, in one dispatch.
// qkv: n_tokens rows of row_stride f32, each [Q: n_heads][K: n_kv_heads][V: n_kv_heads] heads of
// head_dim from x_off. cache: K heads from k_off, V heads from v_off, each
// [n_kv_heads, ctx, head_dim]; token t goes to position pos0 + t. RoPE as in rope.wgsl
// (normal pairs (2i, 2i+1) or neox pairs (i, i + n_rot/2); elements past n_rot unrotated).
// The rotated K is written to the cache only; Q is rotated in place.
// One thread per element pair: n_tokens * (n_heads + 2 n_kv_heads) * head_dim / 2 threads;
// grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(that / WG).

override WG: u32 = 256u;

struct Params {
  n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32,
  n_rot: u32, row_stride: u32, x_off: u32, pos0: u32,
  ctx: u32, k_off: u32, v_off: u32, neox: u32,
  base: f32, freq_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;

const TWO_PI: f32 = 6.283185307179586;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let half_hd = p.head_dim / 2u;
  let n_all = p.n_heads + 2u * p.n_kv_heads;
  let g = (wg.x + wg.y * nwg.x) * WG + lid;
  if (g >= p.n_tokens * n_all * half_hd) { return; }
  let i = g % half_hd;  // pair index within the head
  let h = (g / half_hd) % n_all;
  let t = g / (half_hd * n_all);
  let src = t * p.row_stride + p.x_off + h * p.head_dim;
  let half_rot = p.n_rot / 2u;
  // element pair (a, b) of this thread, relative to the head
  var a = 2u * i;
  var b = a + 1u;
  if (i < half_rot && p.neox != 0u) {
    a = i;
    b = i + half_rot;
  }
  var x0 = qkv[src + a];
  var x1 = qkv[src + b];
  if (i < half_rot && h < p.n_heads + p.n_kv_heads) {
    let pos = f32(p.pos0 + t);
    var theta = pos * p.freq_scale * pow(p.base, -2.0 * f32(i) / f32(p.n_rot));
    theta = theta - TWO_PI * floor(theta / TWO_PI);  // sin/cos are accurate near [-pi, pi] only
    let c = cos(theta);
    let s = sin(theta);
    let r0 = x0 * c - x1 * s;
    let r1 = x0 * s + x1 * c;
    x0 = r0;
    x1 = r1;
  }
  if (h < p.n_heads) {
    qkv[src + a] = x0;
    qkv[src + b] = x1;
  } else {
    let is_v = h >= p.n_heads + p.n_kv_heads;
    let kvh = select(h - p.n_heads, h - p.n_heads - p.n_kv_heads, is_v);
    let dst = select(p.k_off, p.v_off, is_v) + (kvh * p.ctx + p.pos0 + t) * p.head_dim;
    cache[dst + a] = x0;
    cache[dst + b] = x1;
  }
}
