// Greedy decode: out[0] = index of the largest x[x_off + i], i < n (lowest index on ties,
// NaNs ignored, like numpy argmax on finite input); out[1] = bitcast of that value.
// One workgroup. Grid: (1).

override WG: u32 = 256u;

struct Params { n: u32, x_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
  var bv = -3.402823e38;
  var bi = 0xffffffffu;
  for (var i = lid; i < p.n; i += WG) {
    let v = x[p.x_off + i];
    if (v > bv || (bi == 0xffffffffu && v == v)) { bv = v; bi = i; }
  }
  best_v[lid] = bv;
  best_i[lid] = bi;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) {
      let ov = best_v[lid + s];
      let oi = best_i[lid + s];
      let mv = best_v[lid];
      let mi = best_i[lid];
      if (oi != 0xffffffffu && (mi == 0xffffffffu || ov > mv || (ov == mv && oi < mi))) {
        best_v[lid] = ov;
        best_i[lid] = oi;
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    out[0] = best_i[0];
    out[1] = bitcast<u32>(best_v[0]);
  }
}
