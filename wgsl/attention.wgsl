// Causal grouped-query attention over the KV cache, one (head, query token) per workgroup.
// q: n_tokens rows of q_stride f32, head h at q_off + h * head_dim (a fused QKV row works).
// kv: K heads at k_off and V heads at v_off, each [n_kv_heads, ctx, head_dim] f32.
// Query t sits at position pos0 + t and sees keys 0 ..= pos0 + t (causal); query head h
// reads KV head h / (n_heads / n_kv_heads). Softmax is online (running max and sum, one
// chunk of WG keys at a time), so it is numerically stable for any context length.
//   out[t, out_off + h * head_dim + d] = sum_j softmax_j(scale * q.k_j) v_j[d]
// Decode is n_tokens = 1; prefill runs all prompt tokens in one dispatch.
// Needs head_dim <= WG (WG a power of two). Grid: (n_heads, n_tokens).

override WG: u32 = 64u;

struct Params {
  n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32,
  q_stride: u32, q_off: u32, ctx: u32, k_off: u32,
  v_off: u32, pos0: u32, out_stride: u32, out_off: u32,
  scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kv: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const NEG_BIG: f32 = -3.0e38;  // stands for -inf; exp(NEG_BIG - m) == 0

var<workgroup> qh: array<f32, WG>;
var<workgroup> probs: array<f32, WG>;
var<workgroup> red: array<f32, WG>;

fn reduce_max(v: f32, lid: u32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let n_keys = p.pos0 + t + 1u;
  if (lid < p.head_dim) {
    qh[lid] = q[t * p.q_stride + p.q_off + h * p.head_dim + lid] * p.scale;
  }
  workgroupBarrier();
  let kbase = p.k_off + kvh * p.ctx * p.head_dim;
  let vbase = p.v_off + kvh * p.ctx * p.head_dim;
  var m = NEG_BIG;
  var l = 0.0;
  var acc = 0.0;
  for (var c = 0u; c < n_keys; c += WG) {
    let j = c + lid;
    var s = NEG_BIG;
    if (j < n_keys) {
      s = 0.0;
      let kr = kbase + j * p.head_dim;
      for (var d = 0u; d < p.head_dim; d++) {
        s += qh[d] * kv[kr + d];
      }
    }
    let m_new = max(m, reduce_max(s, lid));
    let pj = select(0.0, exp(s - m_new), j < n_keys);
    probs[lid] = pj;
    let alpha = exp(m - m_new);
    l = l * alpha + reduce_sum(pj, lid);  // reduce_sum's barriers also publish probs
    if (lid < p.head_dim) {
      var a = acc * alpha;
      let cn = min(WG, n_keys - c);
      for (var i = 0u; i < cn; i++) {
        a += probs[i] * kv[vbase + (c + i) * p.head_dim + lid];
      }
      acc = a;
    }
    m = m_new;
    workgroupBarrier();  // everyone is done with probs before the next chunk writes it
  }
  if (lid < p.head_dim) {
    out[t * p.out_stride + p.out_off + h * p.head_dim + lid] = acc / l;
  }
}
