// Residual add in place: a[a_off + i] += b[b_off + i] for i < n.
// Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n / WG).

override WG: u32 = 256u;

struct Params { n: u32, a_off: u32, b_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wg.x + wg.y * nwg.x) * WG + lid;
  if (i >= p.n) { return; }
  a[p.a_off + i] += b[p.b_off + i];
}
