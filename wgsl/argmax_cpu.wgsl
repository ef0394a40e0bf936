// Greedy decode for CPU adapters, in two dispatches without shared memory or barriers
// (emulated, hence slow, on CPUs). Same result as argmax.wgsl: out[0] = index of the largest
// x[x_off + i], i < n (lowest index on ties, NaNs ignored), out[1] = bitcast of that value.
//   STAGE 0, grid (ceil(n_parts / WG)): invocation g scans i in [g * chunk, (g + 1) * chunk)
//            and writes part[2 g] = its best index (0xffffffff if none), part[2 g + 1] = value bits.
//   STAGE 1, grid (1), WG 1: scans the n_parts partials in order into out[0..2].

override WG: u32 = 64u;
override STAGE: u32 = 0u;

struct Params { n: u32, x_off: u32, chunk: u32, n_parts: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> part: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  var bv = -3.402823e38;
  var bi = 0xffffffffu;
  if (STAGE == 0u) {
    let g = gid.x;
    if (g >= p.n_parts) { return; }
    let i0 = g * p.chunk;
    let i1 = min(p.n, i0 + p.chunk);
    for (var i = i0; i < i1; i++) {
      let v = x[p.x_off + i];
      if (v > bv || (bi == 0xffffffffu && v == v)) { bv = v; bi = i; }
    }
    part[2u * g] = bi;
    part[2u * g + 1u] = bitcast<u32>(bv);
  } else {
    if (gid.x != 0u) { return; }
    for (var g = 0u; g < p.n_parts; g++) {
      let i = part[2u * g];
      let v = bitcast<f32>(part[2u * g + 1u]);
      if (i != 0xffffffffu && (bi == 0xffffffffu || v > bv)) { bv = v; bi = i; }
    }
    out[0] = bi;
    out[1] = bitcast<u32>(bv);
  }
}
