// Second pass of split-K attention (see attention.wgsl, PARTIAL = 1): merge n_splits partial
// results (acc[head_dim], m, l) per (token, head), rescaling each by exp(m_s - max m):
//   out[t, out_off + h * head_dim + d] = sum_s e^(m_s - M) acc_s[d] / sum_s e^(m_s - M) l_s
// Empty splits (past the causal end) carry m = -3e38, l = 0 and drop out.
// Needs head_dim <= WG. Grid: (n_heads, n_tokens).

override WG: u32 = 64u;

struct Params { n_heads: u32, head_dim: u32, n_splits: u32, out_stride: u32, out_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  if (lid >= p.head_dim) { return; }
  let stride = p.head_dim + 2u;
  let base = (t * p.n_heads + h) * p.n_splits * stride;
  var mx = -3.0e38;
  for (var s = 0u; s < p.n_splits; s++) {
    mx = max(mx, part[base + s * stride + p.head_dim]);
  }
  var acc = 0.0;
  var l = 0.0;
  for (var s = 0u; s < p.n_splits; s++) {
    let ps = base + s * stride;
    let f = exp(part[ps + p.head_dim] - mx);
    acc += f * part[ps + lid];
    l += f * part[ps + p.head_dim + 1u];
  }
  out[t * p.out_stride + p.out_off + h * p.head_dim + lid] = acc / l;
}
