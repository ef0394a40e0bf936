// Dense layer: Y = epilogue(X · W + bias), all f32 row-major, as BERT's nn.Linear layers
// (weights stored transposed at load, (in, out)):
//   X [m, k] activations, W [k, n], bias [n], Y [m, n];
//   EPILOGUE 0: Y = X W + bias
//            1: Y = gelu(X W + bias)          exact GELU, x Phi(x), through erfc (below)
//            2: Y = X W + bias + res          res [m, n]: the residual add before a post-LN
// k and n must be multiples of 4 (rows are read as vec4); m is any. res is ignored unless
// EPILOGUE is 2 (bind any read-only buffer there, e.g. bias). Y may not alias X or res.
// Tiling: a workgroup of 16 x 16 threads computes a 64 x 64 tile of Y, each thread 4 rows x
// 4 columns (a vec4 of each row). Over k, 16 at a time, the 64 x 16 tile of X (transposed, so
// that a thread reads its 4 rows as one vec4) and the 16 x 64 tile of W are staged in
// workgroup memory: each element loaded from global memory is used 64 times.
// Grid: (ceil(n / 64), ceil(m / 64)).

override EPILOGUE: u32 = 0u;

struct Params { m: u32, n: u32, k: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> res: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<vec4<f32>>;

const BK: u32 = 16u;  // k per step
const TM: u32 = 64u;  // rows of Y per tile
const TN4: u32 = 16u;  // vec4 columns of Y per tile (64 columns)

var<workgroup> xs: array<vec4<f32>, 256>;  // [BK][TM / 4]: xs[kk * 16 + r / 4][r % 4] = X[m0 + r, k0 + kk]
var<workgroup> ws: array<vec4<f32>, 256>;  // [BK][TN4]:    ws[kk * 16 + c4] = W[k0 + kk, n0 + 4 c4 ..]

// erfc(u) / 2 for u >= 0: Abramowitz & Stegun 7.1.26, erfc(u) = t (a1 + ... + a5 t^4) e^{-u^2},
// t = 1 / (1 + p u), |error| <= 1.5e-7; the same formula as rag/bert_numpy.py, so the two
// backends differ by float rounding only.
fn half_erfc(u: f32) -> f32 {
  let t = 1.0 / (1.0 + 0.3275911 * u);
  let poly = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))));
  return poly * exp(-u * u);
}

// x Phi(x) = x (1 + erf(x / sqrt 2)) / 2. With h = erfc(|x| / sqrt 2) / 2, Phi(x) is 1 - h for
// x >= 0 and h for x < 0: no cancellation for negative x, where GELU is small.
fn gelu(v: f32) -> f32 {
  let h = half_erfc(abs(v) * 0.70710678118654752);
  return v * select(h, 1.0 - h, v >= 0.0);
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
  let k4 = p.k / 4u;
  let n4 = p.n / 4u;
  let m0 = wg.y * TM;
  let c4 = wg.x * TN4 + lid.x;  // this thread's vec4 column of Y
  // loader roles: X row m0 + xr, k0 + 4 xq ..; W row k0 + wr, vec4 column wg.x * 16 + wq
  let xr = li / 4u;
  let xq = li % 4u;
  let wr = li / 16u;
  let wq = wg.x * TN4 + li % 16u;
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0);
  var acc3 = vec4<f32>(0.0);
  for (var k0 = 0u; k0 < p.k; k0 += BK) {
    let kx = k0 / 4u + xq;
    var xv = vec4<f32>(0.0);
    if (m0 + xr < p.m && kx < k4) { xv = x[(m0 + xr) * k4 + kx]; }
    for (var e = 0u; e < 4u; e++) {
      xs[(4u * xq + e) * 16u + xr / 4u][xr % 4u] = xv[e];
    }
    var wv = vec4<f32>(0.0);
    if (k0 + wr < p.k && wq < n4) { wv = w[(k0 + wr) * n4 + wq]; }
    ws[li] = wv;
    workgroupBarrier();
    for (var kk = 0u; kk < BK; kk++) {
      let a = xs[kk * 16u + lid.y];  // rows 4 lid.y .. + 3 of the tile
      let b = ws[kk * 16u + lid.x];
      acc0 += a.x * b;
      acc1 += a.y * b;
      acc2 += a.z * b;
      acc3 += a.w * b;
    }
    workgroupBarrier();
  }
  if (c4 >= n4) { return; }
  let bv = bias[c4];
  for (var i = 0u; i < 4u; i++) {
    let r = m0 + 4u * lid.y + i;
    if (r >= p.m) { break; }
    var v = bv + select(select(select(acc3, acc2, i == 2u), acc1, i == 1u), acc0, i == 0u);
    let o = r * n4 + c4;
    if (EPILOGUE == 1u) {
      v = vec4<f32>(gelu(v.x), gelu(v.y), gelu(v.z), gelu(v.w));
    } else if (EPILOGUE == 2u) {
      v += res[o];
    }
    y[o] = v;
  }
}
