//! run.zig: inference for Llama 2 models in llama2.c's model.bin format, in Zig.
//!
//! A port of run.c with the same command line and output: model.bin versions
//! 0 (legacy fp32), 1 (fp32 with header) and 2 (int8 Q8_0), tokenizer.bin,
//! greedy or top-p sampling with the same xorshift RNG, generate and chat.
//! SIMD through @Vector; native builds split each matmul's rows over a small
//! pool of std.Thread workers (OMP_NUM_THREADS of them, as run.c).
//!
//!   make runzig && ./runzig model.bin -n 256 -i "Once upon a time"
//!
//! The same file builds for wasm32-wasi (`make wasm`, single-threaded) and is
//! the core of the browser module (run_web.zig).
//!
//! Every failure is an error union; the words for the user go into a
//! `Diagnostic` next to it, so one line on stderr names the file or flag.

const std = @import("std");
const builtin = @import("builtin");
const Io = std.Io;
const Allocator = std.mem.Allocator;

pub const magic: u32 = 0x616b3432;
pub const bos: u32 = 1;
pub const eos: u32 = 2;

// ------------------------------------------------------------------ errors

pub const Error = error{ BadModel, BadTokenizer, BadInput, OutOfMemory };

/// The message that goes with an error: what was wrong, and with which file or flag.
pub const Diagnostic = struct {
    buf: [640]u8 = undefined,
    msg: []const u8 = "",

    /// Record the message and hand back `err`, for `return diag.fail(...)`.
    pub fn fail(d: *Diagnostic, err: Error, comptime fmt: []const u8, args: anytype) Error {
        d.msg = std.fmt.bufPrint(&d.buf, fmt, args) catch d.buf[0..];
        return err;
    }
};

// ------------------------------------------------------------------ model

pub const Config = struct {
    dim: usize, // D: residual stream width
    hidden_dim: usize, // H: feed-forward width
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize, // < n_heads: grouped-query attention
    vocab_size: usize,
    seq_len: usize,

    pub fn headSize(c: Config) usize {
        return c.dim / c.n_heads;
    }
    pub fn kvDim(c: Config) usize {
        return c.n_kv_heads * c.headSize();
    }
};

const field_names = [7][]const u8{ "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len" };
const field_max = [7]i32{ 1 << 16, 1 << 20, 1 << 10, 1 << 16, 1 << 16, 1 << 24, 1 << 20 };
const max_vocab = field_max[5];
const max_state_bytes: u64 = 16 << 30;

/// One weight matrix (rows × cols, row-major): fp32, or Q8_0 int8 values with
/// one fp32 scale per `gs` consecutive values of a row.
pub const Matrix = union(enum) {
    f32: []const f32,
    q8: struct { q: []const i8, s: []const f32, gs: usize },
};

pub const Layer = struct {
    rms_att: []const f32,
    rms_ffn: []const f32,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    w1: Matrix,
    w2: Matrix,
    w3: Matrix,
};

/// Bytes of the file the header implies (the sizes cannot overflow: the
/// header bounds keep every product below 2^50).
fn expectedSize(c: Config, version: u8, shared: bool, gs: usize) u64 {
    const D: u64 = c.dim;
    const H: u64 = c.hidden_dim;
    const L: u64 = c.n_layers;
    const V: u64 = c.vocab_size;
    const S: u64 = c.seq_len;
    const hs: u64 = c.headSize();
    const kvD: u64 = c.kvDim();
    const norms = 2 * L * D + D;
    const per_layer = 2 * D * D + 2 * kvD * D + 3 * H * D;
    const cls: u64 = if (shared) 0 else V * D;
    return switch (version) {
        0 => 28 + 4 * (norms + V * D + L * per_layer + 2 * S * (hs / 2) + cls),
        1 => 256 + 4 * (norms + V * D + L * per_layer + cls),
        else => blk: {
            const qb = struct {
                fn f(numel: u64, g: u64) u64 {
                    return numel + 4 * (numel / g);
                }
            }.f;
            var q = qb(V * D, gs) * @as(u64, if (shared) 1 else 2);
            q += L * (2 * qb(D * D, gs) + 2 * qb(kvD * D, gs) + 3 * qb(H * D, gs));
            break :blk 256 + 4 * norms + q;
        },
    };
}

/// Walks the weights in file order; sizes were checked up front, so running
/// out means a bug here, reported rather than read past.
const Cursor = struct {
    bytes: []const u8,
    unaligned: bool = false,

    fn take(cur: *Cursor, n: usize) error{Truncated}![]const u8 {
        if (n > cur.bytes.len) return error.Truncated;
        defer cur.bytes = cur.bytes[n..];
        return cur.bytes[0..n];
    }
    fn floats(cur: *Cursor, n: usize) error{Truncated}![]const f32 {
        const b = try cur.take(4 * n);
        if (!std.mem.isAligned(@intFromPtr(b.ptr), 4)) {
            cur.unaligned = true; // only int8 scales after odd group sizes
            return &.{};
        }
        return @as([*]const f32, @ptrCast(@alignCast(b.ptr)))[0..n];
    }
    fn matrix(cur: *Cursor, numel: usize, gs: usize) error{Truncated}!Matrix {
        if (gs == 0) return .{ .f32 = try cur.floats(numel) };
        const q = try cur.take(numel);
        return .{ .q8 = .{ .q = @ptrCast(q), .s = try cur.floats(numel / gs), .gs = gs } };
    }
};

/// RMSNorm's epsilon and RoPE's base when the header has none (v0) or says 0.
pub const default_norm_eps: f64 = 1e-5;
pub const default_rope_theta: f64 = 10000.0;

/// A header as read, before its checks.
const RawHeader = struct {
    fields: [7]i32 = undefined, // dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    version: u8 = 0,
    shared: bool = false,
    group_size: i32 = 0,
    norm_eps: f64 = 0,
    rope_theta: f64 = 0,
};

/// What a model.bin header says, checked, and checked against the file's size.
const Header = struct {
    config: Config,
    version: u8,
    shared: bool,
    group_size: usize, // Q8_0 group size (v2); 0 for fp32
    norm_eps: f64,
    rope_theta: f64, // pair i of a head turns by pos / theta^(i/hs)
};

/// The header of `bytes`, a whole model.bin: version 0 (llama2.c's legacy 28
/// bytes, no magic) or 1 and 2 (256 bytes after the magic).
fn readHeader(bytes: []const u8, name: []const u8, diag: *Diagnostic) Error!Header {
    return readHeaderOf(bytes[0..@min(bytes.len, 256)], bytes.len, name, diag);
}

/// The header from the first bytes of a model.bin (`head`: up to 256 of them),
/// checked against the file's size.
fn readHeaderOf(head: []const u8, size: u64, name: []const u8, diag: *Diagnostic) Error!Header {
    if (size == 0) return diag.fail(error.BadModel, "{s}: file is empty", .{name});
    if (size < 28) return diag.fail(error.BadModel, "{s}: file is {d} bytes, too short for a header", .{ name, size });
    const raw = if (readInt(u32, head, 0) == magic) try readHeaderV12(head, size, name, diag) else readHeaderV0(head);
    return checkHeader(raw, size, name, diag);
}

fn readHeaderV0(bytes: []const u8) RawHeader {
    var h: RawHeader = .{}; // no room for norm_eps and rope_theta: the defaults
    for (&h.fields, 0..) |*f, i| f.* = readInt(i32, bytes, 4 * i);
    // no magic: a negative vocab_size means an unshared classifier at the end
    if (h.fields[5] == std.math.minInt(i32)) h.fields[5] = 0;
    h.shared = h.fields[5] > 0;
    h.fields[5] = @intCast(@abs(h.fields[5]));
    return h;
}

fn readHeaderV12(bytes: []const u8, size: u64, name: []const u8, diag: *Diagnostic) Error!RawHeader {
    if (size < 256) return diag.fail(error.BadModel, "{s}: file is {d} bytes, cut off inside the 256-byte header", .{ name, size });
    const v = readInt(i32, bytes, 4);
    if (v != 1 and v != 2) return diag.fail(error.BadModel, "{s}: unknown model.bin version {d} (this runtime reads 0, 1 and 2)", .{ name, v });
    const flag = bytes[36];
    if (flag > 1) return diag.fail(error.BadModel, "{s}: bad header: shared_classifier flag is {d} (must be 0 or 1)", .{ name, flag });
    var h: RawHeader = .{
        .version = @intCast(v),
        .shared = flag == 1,
        .group_size = if (v == 2) readInt(i32, bytes, 37) else 0, // unaligned, right after the flag byte
        .norm_eps = @bitCast(std.mem.readInt(u64, bytes[64..][0..8], .little)),
        .rope_theta = @bitCast(std.mem.readInt(u64, bytes[72..][0..8], .little)),
    };
    for (&h.fields, 0..) |*f, i| f.* = readInt(i32, bytes, 8 + 4 * i);
    return h;
}

/// Checks for every version: the shape, v2's group size, norm_eps and
/// rope_theta, and the file size the header implies.
fn checkHeader(raw: RawHeader, size: u64, name: []const u8, diag: *Diagnostic) Error!Header {
    const config = checkConfig(raw.fields, name, diag) catch |err| {
        if (raw.version == 0) { // no magic and no plausible v0 header: say both
            var tmp: [640]u8 = undefined;
            const first = std.fmt.bufPrint(&tmp, "{s}", .{diag.msg}) catch diag.msg;
            return diag.fail(err, "{s} (no magic 0x{x:0>8}, read as version 0)", .{ first, magic });
        }
        return err;
    };
    const D = config.dim;
    const g = raw.group_size;
    // every tensor has dim as a factor, so the groups tile it (w2's rows may
    // still end mid-group: see splitStraddledGroups)
    if (raw.version == 2 and (g <= 0 or D % @as(usize, @intCast(g)) != 0))
        return diag.fail(error.BadModel, "{s}: group size {d} does not divide dim {d}", .{ name, g, D });
    const h: Header = .{
        .config = config,
        .version = raw.version,
        .shared = raw.shared,
        .group_size = if (raw.version == 2) @intCast(g) else 0,
        .norm_eps = try checkReal(raw.norm_eps, default_norm_eps, "norm_eps", name, diag),
        .rope_theta = try checkReal(raw.rope_theta, default_rope_theta, "rope_theta", name, diag),
    };
    const want = expectedSize(config, h.version, h.shared, h.group_size);
    if (want != size) {
        return diag.fail(error.BadModel, "{s}: file is {d} bytes but its version-{d} header (dim {d}, hidden_dim {d}, n_layers {d}, " ++
            "n_heads {d}, n_kv_heads {d}, vocab_size {d}, seq_len {d}{s}) needs {d} bytes{s}", .{
            name,              size,               h.version,         D,                 config.hidden_dim,
            config.n_layers,   config.n_heads,     config.n_kv_heads, config.vocab_size, config.seq_len,
            if (h.shared) "" else ", unshared classifier", want, if (size < want) " (cut off?)" else "",
        });
    }
    return h;
}

/// norm_eps or rope_theta: 0 means the default; otherwise a positive number in
/// f32's normal range (the forward pass's type). Judged on the bits, as run.c
/// does (a positive f64's bits order as its values do).
fn checkReal(v: f64, default: f64, field: []const u8, name: []const u8, diag: *Diagnostic) Error!f64 {
    const u: u64 = @bitCast(v);
    if (u << 1 == 0) return default; // +0 or -0
    const lo: u64 = @bitCast(@as(f64, std.math.floatMin(f32)));
    const hi: u64 = @bitCast(@as(f64, std.math.floatMax(f32)));
    if (u < lo or u > hi) // negative, NaN and infinities lie past hi
        return diag.fail(error.BadModel, "{s}: bad header: {s} = {e} (must be 0 for the default, or a number from {e} to {e})", .{ name, field, v, @as(f64, std.math.floatMin(f32)), @as(f64, std.math.floatMax(f32)) });
    return v;
}

/// NaN and infinity are judged on the bits (exponent all ones), as run.c does:
/// bit 31 of (exponent + 1) is set only by that exponent, so OR-ing this over
/// many words tests them all. For a u32 or a vector of them.
inline fn nonFiniteBits(v: anytype) @TypeOf(v) {
    const T = @TypeOf(v);
    const exponent: T = if (@typeInfo(T) == .vector) @splat(0x7f800000) else 0x7f800000;
    const one: T = if (@typeInfo(T) == .vector) @splat(0x00800000) else 0x00800000;
    return (v & exponent) +% one;
}

const check_lanes = 16;
const Words = @Vector(check_lanes, u32);

/// Whether any of these 4-byte words could be a NaN or infinity.
fn anyNonFinite(words: []const u32) bool {
    var acc: Words = @splat(0);
    var i: usize = 0;
    while (i + check_lanes <= words.len) : (i += check_lanes) acc |= nonFiniteBits(@as(Words, words[i..][0..check_lanes].*));
    var any = @reduce(.Or, acc);
    for (words[i..]) |u| any |= nonFiniteBits(u);
    return any >> 31 != 0;
}

/// x86-64 with AVX: copyChecking's stores go past the cache, as memcpy's do
/// for copies this large; plain stores first read each line of the
/// destination, a third more memory traffic: measured, that made the check
/// cost a tenth of the time to load a 110M fp32 model, and with it nothing.
const stream_stores = builtin.cpu.arch == .x86_64 and std.Target.x86.featureSetHas(builtin.cpu.features, .avx);

inline fn storeStreaming(d: *align(32) [check_lanes]u32, v: Words) void {
    const halves: [2]@Vector(8, u32) = @bitCast(v);
    inline for (halves, 0..) |h, k| asm volatile ("vmovntdq %[v], (%[p])"
        :
        : [v] "x" (h),
          [p] "r" (&d[8 * k]),
        : .{ .memory = true });
}

/// @memcpy that also says whether any 4-byte word it copied could be a NaN or
/// infinity, in the same pass: the test rides on the copy's loads, free in a
/// loop bound by memory (as run.c's copy_checking). In vectors: the compiler
/// does not vectorise the plain loop.
fn copyChecking(dst: []align(4) u8, src: []align(4) const u8) bool {
    const n = src.len / 4;
    const d: []u32 = @ptrCast(dst[0 .. 4 * n]);
    const s: []const u32 = @ptrCast(src[0 .. 4 * n]);
    const streaming = stream_stores and @intFromPtr(dst.ptr) % 32 == 0;
    var acc: Words = @splat(0);
    var i: usize = 0;
    while (i + check_lanes <= n) : (i += check_lanes) {
        const v: Words = s[i..][0..check_lanes].*;
        if (streaming) storeStreaming(@alignCast(d[i..][0..check_lanes]), v) else d[i..][0..check_lanes].* = v;
        acc |= nonFiniteBits(v);
    }
    if (streaming) asm volatile ("sfence" ::: .{ .memory = true });
    var any = @reduce(.Or, acc);
    for (d[i..], s[i..]) |*x, u| {
        x.* = u;
        any |= nonFiniteBits(u);
    }
    @memcpy(dst[4 * n ..], src[4 * n ..]);
    return any >> 31 != 0;
}

/// The index of the first NaN or infinity in p, or null: block by block, each
/// searched only if it holds one.
fn firstNonFinite(p: []const f32) ?usize {
    const u: []const u32 = @ptrCast(p);
    var b: usize = 0;
    while (b < u.len) : (b += 4096) {
        const block = u[b..@min(u.len, b + 4096)];
        if (anyNonFinite(block)) for (block, b..) |x, i| if (x & 0x7f800000 == 0x7f800000) return i;
    }
    return null;
}

/// An error naming the tensor when `p` holds a NaN or infinity: in its
/// weights, or in the scales of its int8 groups; `layer` null: not a layer's.
fn checkTensor(p: []const f32, tensor: []const u8, layer: ?usize, scales: bool, name: []const u8, diag: *Diagnostic) Error!void {
    const i = firstNonFinite(p) orelse return;
    var buf: [32]u8 = undefined;
    return diag.fail(error.BadModel, "{s}: {s}{s}: NaN or infinity in its {s} ({s} {d})", .{ name, tensor, layerSuffix(&buf, layer), if (scales) "scales" else "weights", if (scales) "group" else "element", i });
}

/// " of layer N" for a layer's tensor, else ""
fn layerSuffix(buf: *[32]u8, layer: ?usize) []const u8 {
    const l = layer orelse return "";
    return std.fmt.bufPrint(buf, " of layer {d}", .{l}) catch "";
}

fn checkMatrix(m: Matrix, tensor: []const u8, layer: ?usize, name: []const u8, diag: *Diagnostic) Error!void {
    switch (m) {
        .f32 => |w| try checkTensor(w, tensor, layer, false, name, diag),
        .q8 => |w| {
            try checkTensor(w.s, tensor, layer, true, name, diag);
            // Q8_0 writes -127..127; the vector kernels move x's sign onto w,
            // where -128 would stay -128 (as run.c)
            const i = std.mem.indexOfScalar(i8, w.q, -128) orelse return;
            var buf: [32]u8 = undefined;
            return diag.fail(error.BadModel, "{s}: {s}{s}: int8 value -128 in its weights (element {d}); Q8_0 values are -127..127", .{ name, tensor, layerSuffix(&buf, layer), i });
        },
    }
}

/// The seven matrices of a layer in file order, and their shapes (rows × cols).
const matrix_kinds = [7][]const u8{ "wq", "wk", "wv", "wo", "w1", "w2", "w3" };

fn matrixShapes(c: Config) [7][2]usize {
    const D = c.dim;
    const H = c.hidden_dim;
    const kvD = c.kvDim();
    return .{ .{ D, D }, .{ kvD, D }, .{ kvD, D }, .{ D, D }, .{ H, D }, .{ D, H }, .{ H, D } };
}

pub const Transformer = struct {
    config: Config,
    version: u8,
    shared: bool,
    group_size: usize, // Q8_0 group size (v2); 0 for fp32
    norm_eps: f64, // RMSNorm's epsilon
    rope_theta: f64, // RoPE's base
    w2_scales: []f32 = &.{}, // w2's scales per row, when its groups straddle rows
    rms_final: []const f32,
    embedding: Matrix,
    classifier: Matrix,
    layers: []Layer,
    state: State,
    pool: ?*Pool = null,
    gpa: Allocator,
    name: []const u8, // the file, for messages (the caller keeps it)

    /// Point the weights into `bytes` (a whole model.bin, kept alive by the
    /// caller), check that they are finite (unless the caller knows that no
    /// 4-byte word of `bytes` can be a NaN or infinity: `check_finite` false),
    /// and allocate the run state. `name` is for messages.
    pub fn init(gpa: Allocator, bytes: []const u8, name: []const u8, check_finite: bool, diag: *Diagnostic) Error!Transformer {
        const h = try readHeader(bytes, name, diag);
        const config = h.config;
        const gs = h.group_size;
        const layers = try gpa.alloc(Layer, config.n_layers);
        errdefer gpa.free(layers);
        var t: Transformer = .{
            .config = config,
            .version = h.version,
            .shared = h.shared,
            .group_size = gs,
            .norm_eps = h.norm_eps,
            .rope_theta = h.rope_theta,
            .rms_final = &.{},
            .embedding = undefined,
            .classifier = undefined,
            .layers = layers,
            .state = undefined,
            .gpa = gpa,
            .name = name,
        };
        var cur: Cursor = .{ .bytes = bytes[if (h.version == 0) 28 else 256..] };
        const mapped = switch (h.version) {
            0 => t.mapV0(&cur),
            1 => t.mapV1(&cur),
            else => t.mapV2(&cur),
        };
        mapped catch return diag.fail(error.BadModel, "{s}: internal size mismatch", .{name});
        if (cur.unaligned) return diag.fail(error.BadModel, "{s}: group size {d} leaves scales unaligned (unsupported)", .{ name, gs });
        if (cur.bytes.len != 0) return diag.fail(error.BadModel, "{s}: internal size mismatch", .{name});
        if (check_finite) try t.checkFinite(diag);
        if (gs != 0 and config.hidden_dim % gs != 0)
            t.splitStraddledGroups() catch return diag.fail(error.OutOfMemory, "{s}: out of memory", .{name});
        errdefer gpa.free(t.w2_scales);

        const kv_bytes: u64 = 2 * @as(u64, config.n_layers) * config.seq_len * config.kvDim() * @as(u64, if (gs != 0) 2 else 4);
        if (kv_bytes > max_state_bytes)
            return diag.fail(error.BadModel, "{s}: KV cache for seq_len {d} would need {d:.1} GiB", .{ name, config.seq_len, @as(f64, @floatFromInt(kv_bytes)) / 1073741824.0 });
        t.state = State.init(gpa, config, gs != 0, h.rope_theta) catch return diag.fail(error.OutOfMemory, "{s}: out of memory for the run state", .{name});
        return t;
    }

    /// v0 (llama2.c's legacy layout), fp32: embedding, rms_att, wq wk wv wo,
    /// rms_ffn, w1 w2 w3 (each kind all layers in a row), the final norm, and
    /// RoPE tables (recomputed, so skipped).
    fn mapV0(t: *Transformer, cur: *Cursor) error{Truncated}!void {
        const c = t.config;
        t.embedding = .{ .f32 = try cur.floats(c.vocab_size * c.dim) };
        const rms_att = try cur.floats(c.n_layers * c.dim);
        var rms_ffn: []const f32 = undefined;
        var all: [7][]const f32 = undefined;
        for (&all, matrixShapes(c), 0..) |*a, s, k| {
            if (k == 4) rms_ffn = try cur.floats(c.n_layers * c.dim);
            a.* = try cur.floats(c.n_layers * s[0] * s[1]);
        }
        t.rms_final = try cur.floats(c.dim);
        _ = try cur.floats(c.seq_len * (c.headSize() / 2) * 2);
        try t.pointF32(cur, rms_att, rms_ffn, all);
    }

    /// v1, fp32: the norms, the embedding, then wq wk wv wo w1 w2 w3 (each kind
    /// all layers in a row).
    fn mapV1(t: *Transformer, cur: *Cursor) error{Truncated}!void {
        const c = t.config;
        const rms_att = try cur.floats(c.n_layers * c.dim);
        const rms_ffn = try cur.floats(c.n_layers * c.dim);
        t.rms_final = try cur.floats(c.dim);
        t.embedding = .{ .f32 = try cur.floats(c.vocab_size * c.dim) };
        var all: [7][]const f32 = undefined;
        for (&all, matrixShapes(c)) |*a, s| a.* = try cur.floats(c.n_layers * s[0] * s[1]);
        try t.pointF32(cur, rms_att, rms_ffn, all);
    }

    /// fp32 (v0, v1): each layer's norms and matrices cut from their kind's
    /// block of all layers; the classifier follows everything else, unless shared.
    fn pointF32(t: *Transformer, cur: *Cursor, rms_att: []const f32, rms_ffn: []const f32, all: [7][]const f32) error{Truncated}!void {
        const D = t.config.dim;
        const shape = matrixShapes(t.config);
        for (t.layers, 0..) |*layer, l| {
            layer.rms_att = rms_att[l * D ..][0..D];
            layer.rms_ffn = rms_ffn[l * D ..][0..D];
            inline for (matrix_kinds, 0..) |kind, k| {
                const n = shape[k][0] * shape[k][1];
                @field(layer, kind) = .{ .f32 = all[k][l * n ..][0..n] };
            }
        }
        t.classifier = if (t.shared) t.embedding else .{ .f32 = try cur.floats(t.config.vocab_size * D) };
    }

    /// v2 (Q8_0): the fp32 norms, then each matrix as int8 values and their
    /// group scales: the embedding, wq..w3 layer by layer, the classifier
    /// unless shared.
    fn mapV2(t: *Transformer, cur: *Cursor) error{Truncated}!void {
        const c = t.config;
        const D = c.dim;
        const gs = t.group_size;
        const rms_att = try cur.floats(c.n_layers * D);
        const rms_ffn = try cur.floats(c.n_layers * D);
        t.rms_final = try cur.floats(D);
        t.embedding = try cur.matrix(c.vocab_size * D, gs);
        for (t.layers, 0..) |*layer, l| {
            layer.rms_att = rms_att[l * D ..][0..D];
            layer.rms_ffn = rms_ffn[l * D ..][0..D];
        }
        inline for (matrix_kinds, matrixShapes(c)) |kind, s| {
            for (t.layers) |*layer| @field(layer, kind) = try cur.matrix(s[0] * s[1], gs);
        }
        t.classifier = if (t.shared) t.embedding else try cur.matrix(c.vocab_size * D, gs);
    }

    /// Refuse weights that are not all finite, before they reach the forward
    /// pass: the norms, then every matrix's fp32 weights or int8 scales (in one
    /// order for every version, as run.c).
    fn checkFinite(t: *const Transformer, diag: *Diagnostic) Error!void {
        for (t.layers, 0..) |layer, l| {
            try checkTensor(layer.rms_att, "rms_att", l, false, t.name, diag);
            try checkTensor(layer.rms_ffn, "rms_ffn", l, false, t.name, diag);
        }
        try checkTensor(t.rms_final, "rms_final", null, false, t.name, diag);
        try checkMatrix(t.embedding, "embedding", null, t.name, diag);
        inline for (matrix_kinds) |kind| {
            for (t.layers, 0..) |layer, l| try checkMatrix(@field(layer, kind), kind, l, t.name, diag);
        }
        if (!t.shared) try checkMatrix(t.classifier, "classifier", null, t.name, diag);
    }

    /// Groups run over each flattened tensor, so when hidden_dim is not a
    /// multiple of the group size (42M: 1376 with llama2.c's 64), w2's rows end
    /// mid-group. Split its groups at the row ends into groups of
    /// g = gcd(H, gs) that every row sees whole, each keeping its group's
    /// scale: a per-row table built once, after which w2 is an ordinary matrix
    /// of group size g (its input is quantized in groups of g too).
    fn splitStraddledGroups(t: *Transformer) Allocator.Error!void {
        const D = t.config.dim;
        const H = t.config.hidden_dim;
        const gs = t.group_size;
        const g = std.math.gcd(H, gs);
        const per_layer = D * (H / g);
        t.w2_scales = try t.gpa.alloc(f32, t.layers.len * per_layer);
        for (t.layers, 0..) |*layer, l| {
            const w = layer.w2.q8;
            const table = t.w2_scales[l * per_layer ..][0..per_layer];
            for (0..D) |r| {
                for (table[r * (H / g) ..][0 .. H / g], 0..) |*s, k| s.* = w.s[(r * H + k * g) / gs];
            }
            layer.w2 = .{ .q8 = .{ .q = w.q, .s = table, .gs = g } };
        }
    }

    pub fn deinit(t: *Transformer) void {
        if (!builtin.single_threaded) if (t.pool) |pool| pool.deinit();
        t.gpa.free(t.w2_scales);
        t.state.deinit(t.gpa);
        t.gpa.free(t.layers);
        t.* = undefined;
    }

    /// Run the matmuls on `n` threads from now on (native builds; 1 = serial).
    pub fn useThreads(t: *Transformer, io: Io, n: usize) error{ OutOfMemory, SystemResources }!void {
        if (builtin.single_threaded or n <= 1) return;
        t.pool = try Pool.init(t.gpa, io, n);
    }

    /// Logits for `token` at position `pos`; positions before `pos` must have
    /// been run already (they live in the KV cache).
    pub fn forward(t: *Transformer, token: u32, pos: usize, diag: *Diagnostic) Error![]f32 {
        const c = t.config;
        if (token >= c.vocab_size) return diag.fail(error.BadInput, "token {d} out of range 0..{d}", .{ token, c.vocab_size - 1 });
        if (pos >= c.seq_len) return diag.fail(error.BadInput, "position {d} out of range 0..{d}", .{ pos, c.seq_len - 1 });
        const s = &t.state;
        const D = c.dim;
        const eps: f32 = @floatCast(t.norm_eps);
        switch (t.embedding) {
            .f32 => |e| @memcpy(s.x, e[token * D ..][0..D]),
            .q8 => |e| { // dequantise just the row we need
                const gs = t.group_size;
                for (s.x, e.q[token * D ..][0..D], 0..) |*x, q, i| x.* = @as(f32, @floatFromInt(q)) * e.s[(token * D + i) / gs];
            },
        }
        for (t.layers, 0..) |*layer, l| {
            const step: Step = .{ .t = t, .layer = l, .pos = pos };
            rmsnorm(s.xb, s.x, layer.rms_att, eps);
            t.quantizeInput(s.xb);
            t.parallel(step, attentionInputs);
            t.parallel(step, attention); // split by heads, not by t.pool's cuts
            t.quantizeInput(s.xb);
            t.parallel(step, attentionOutput);
            for (s.x, s.xb2) |*x, b| x.* += b;
            rmsnorm(s.xb, s.x, layer.rms_ffn, eps);
            t.quantizeInput(s.xb);
            t.parallel(step, feedForwardIn);
            t.quantizeInput(s.hb);
            t.parallel(step, feedForwardOut);
            for (s.x, s.xb2) |*x, b| x.* += b;
        }
        rmsnorm(s.x, s.x, t.rms_final, eps);
        t.quantizeInput(s.x);
        t.parallel(.{ .t = t, .layer = 0, .pos = pos }, classify);
        if (!builtin.single_threaded) if (t.pool) |pool| pool.rebalance();
        // finite weights can still overflow: stop rather than sample from garbage
        if (firstNonFinite(s.logits) != null)
            return diag.fail(error.BadModel, "{s}: the logits at position {d} are not finite (NaN or infinity): the model's numbers overflow", .{ t.name, pos });
        return s.logits;
    }

    /// int8 models quantize each matmul input once; all rows and threads share it.
    /// Groups of gcd(len, group size): the group size itself, but for w2's
    /// input when its groups straddle rows (splitStraddledGroups).
    fn quantizeInput(t: *Transformer, x: []const f32) void {
        if (t.group_size == 0) return;
        const g = std.math.gcd(x.len, t.group_size);
        quantize(t.state.xq[0..x.len], t.state.xs[0 .. x.len / g], x, g);
    }

    fn parallel(t: *Transformer, step: Step, comptime job: Job) void {
        if (!builtin.single_threaded) if (t.pool) |pool| return pool.run(step, job);
        job(step, .{ .index = 0, .count = 1 });
    }

    /// Rows [lo, hi) of out = m · in.
    fn matmul(t: *Transformer, out: []f32, m: Matrix, in: []const f32, lo: usize, hi: usize) void {
        switch (m) {
            .f32 => |w| matmulF32(out, in, w, lo, hi),
            .q8 => |w| matmulQ8(out, t.state.xq[0..in.len], t.state.xs[0 .. in.len / w.gs], w.q, w.s, w.gs, lo, hi),
        }
    }
};

fn readInt(comptime T: type, bytes: []const u8, offset: usize) T {
    return std.mem.readInt(T, bytes[offset..][0..4], .little);
}

fn checkConfig(raw: [7]i32, name: []const u8, diag: *Diagnostic) Error!Config {
    for (raw, field_names, field_max) |v, field, max| {
        if (v <= 0 or v > max) return diag.fail(error.BadModel, "{s}: bad header: {s} = {d} (must be 1..{d})", .{ name, field, v, max });
    }
    var u: [7]usize = undefined;
    for (&u, raw) |*x, v| x.* = @intCast(v);
    const c: Config = .{ .dim = u[0], .hidden_dim = u[1], .n_layers = u[2], .n_heads = u[3], .n_kv_heads = u[4], .vocab_size = u[5], .seq_len = u[6] };
    if (c.dim % c.n_heads != 0 or c.headSize() % 2 != 0)
        return diag.fail(error.BadModel, "{s}: bad header: dim {d} must split into {d} heads of even size", .{ name, c.dim, c.n_heads });
    if (c.n_kv_heads > c.n_heads or c.n_heads % c.n_kv_heads != 0)
        return diag.fail(error.BadModel, "{s}: bad header: n_heads {d} is not a multiple of n_kv_heads {d}", .{ name, c.n_heads, c.n_kv_heads });
    return c;
}

/// Everything the forward pass writes, allocated once.
const State = struct {
    arena: std.heap.ArenaAllocator,
    x: []f32, // D: residual stream
    xb: []f32, // D: normed input, attention output
    xb2: []f32, // D: branch output
    hb: []f32, // H: feed-forward
    hb2: []f32,
    q: []f32, // D: query
    k: []f32, // kvD: this position's key and value, before they go into the cache
    v: []f32,
    att: []f32, // n_heads × S: attention scores
    logits: []f32, // V
    // L × n_kv_heads × S × hs: each head's keys (values) are one contiguous
    // stream for attention to read, as in run.c (1.1x at 42M int8 over S × kvD).
    // fp32 for fp32 models; fp16 for int8 models, whose activations are rounded
    // to 8 bits already: attention reads half the bytes. One pair is empty.
    key_cache: []f32,
    value_cache: []f32,
    key_cache16: []u16,
    value_cache16: []u16,
    xq: []i8, // the quantized matmul input (int8 models), max(D, H)
    xs: []f32, // its group scales
    rope_cos: []f32, // S × hs/2
    rope_sin: []f32,

    fn init(gpa: Allocator, c: Config, fp16_cache: bool, rope_theta: f64) Allocator.Error!State {
        var arena = std.heap.ArenaAllocator.init(gpa);
        errdefer arena.deinit();
        const a = arena.allocator();
        const hs = c.headSize();
        const kv = c.n_layers * c.seq_len * c.kvDim();
        const wide = @max(c.dim, c.hidden_dim);
        var s: State = .{
            .arena = undefined,
            .x = try a.alloc(f32, c.dim),
            .xb = try a.alloc(f32, c.dim),
            .xb2 = try a.alloc(f32, c.dim),
            .hb = try a.alloc(f32, c.hidden_dim),
            .hb2 = try a.alloc(f32, c.hidden_dim),
            .q = try a.alloc(f32, c.dim),
            .k = try a.alloc(f32, c.kvDim()),
            .v = try a.alloc(f32, c.kvDim()),
            .att = try a.alloc(f32, c.n_heads * c.seq_len),
            .logits = try a.alloc(f32, c.vocab_size),
            .key_cache = try a.alloc(f32, if (fp16_cache) 0 else kv),
            .value_cache = try a.alloc(f32, if (fp16_cache) 0 else kv),
            .key_cache16 = try a.alloc(u16, if (fp16_cache) kv else 0),
            .value_cache16 = try a.alloc(u16, if (fp16_cache) kv else 0),
            .xq = try a.alloc(i8, wide),
            .xs = try a.alloc(f32, wide),
            .rope_cos = try a.alloc(f32, c.seq_len * hs / 2),
            .rope_sin = try a.alloc(f32, c.seq_len * hs / 2),
        };
        @memset(s.key_cache, 0);
        @memset(s.value_cache, 0);
        @memset(s.key_cache16, 0);
        @memset(s.value_cache16, 0);
        // RoPE as PyTorch computes it (fp32 frequencies and angles): pair
        // (i, i+1) of each head turns by pos / theta^(i/hs).
        const theta: f32 = @floatCast(rope_theta);
        for (0..c.seq_len) |pos| {
            var i: usize = 0;
            while (i < hs) : (i += 2) {
                // theta^e in f64, rounded once to f32 (as run.c: libraries that
                // differ in an f64's last bit still agree on the f32)
                const e = @as(f32, @floatFromInt(i)) / @as(f32, @floatFromInt(hs));
                const freq = 1.0 / @as(f32, @floatCast(std.math.pow(f64, theta, e)));
                const angle: f64 = @as(f32, @floatFromInt(pos)) * freq;
                s.rope_cos[pos * (hs / 2) + i / 2] = @floatCast(@cos(angle));
                s.rope_sin[pos * (hs / 2) + i / 2] = @floatCast(@sin(angle));
            }
        }
        s.arena = arena;
        return s;
    }

    fn deinit(s: *State, _: Allocator) void {
        s.arena.deinit();
    }
};

// ------------------------------------------------------------------ forward pass: kernels

// Every build computes the same bits (docs/formats.md, "Arithmetic"), as run.c:
// no fused multiply-adds (Zig fuses only where asked), and one order for each
// sum whatever the vector width. Sums of n terms go into 16 lanes (term j into
// lane j % 16) for the first n - n % 16 terms, the lanes fold as l + l+8,
// l + l+4, l + l+2, l + l+1, and the tail adds on in order. A V16 is those
// lanes on every target: LLVM splits it into the vectors the CPU has, lane
// for lane.

const f32_lanes = std.simd.suggestVectorLength(f32) orelse 4;
const F32s = @Vector(f32_lanes, f32);
const V16 = @Vector(16, f32);
const F32x8 = @Vector(8, f32);

inline fn load(s: []const f32, i: usize) F32s {
    return s[i..][0..f32_lanes].*;
}

inline fn load16(s: []const f32, i: usize) V16 {
    return s[i..][0..16].*;
}

const F32x4 = @Vector(4, f32);

/// Eight lanes folded: l + l+4, l + l+2, l + l+1. In four-lane halves, as
/// wide shuffles become lane-by-lane code under WebAssembly.
fn fold8(v: F32x8) f32 {
    const q: [2]F32x4 = @bitCast(v);
    const c = q[0] + q[1];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/// Sixteen lanes folded: l + l+8, then as fold8.
fn fold16(v: V16) f32 {
    const q: [4]F32x4 = @bitCast(v);
    const c = (q[0] + q[2]) + (q[1] + q[3]);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/// a · b in the order above
fn dot(a: []const f32, b: []const f32) f32 {
    var acc: V16 = @splat(0);
    var i: usize = 0;
    while (i + 16 <= a.len) : (i += 16) acc += load16(a, i) * load16(b, i);
    var sum = fold16(acc);
    while (i < a.len) : (i += 1) sum += a[i] * b[i];
    return sum;
}

/// The sum of x in the order above.
fn sum16(x: []const f32) f32 {
    var acc: V16 = @splat(0);
    var i: usize = 0;
    while (i + 16 <= x.len) : (i += 16) acc += load16(x, i);
    var sum = fold16(acc);
    while (i < x.len) : (i += 1) sum += x[i];
    return sum;
}

/// IEEE half precision (fp16) for the KV cache of int8 models, by bit
/// arithmetic as run.c does, so that every target rounds alike: to nearest
/// even, saturating at +-65504 instead of overflowing to infinity.
fn toF16(f: f32) u16 {
    var u: u32 = @bitCast(f);
    const sign: u32 = (u >> 16) & 0x8000;
    u &= 0x7fffffff;
    if (u >= 0x477ff000) return @intCast(sign | 0x7bff); // rounds to 65520 or more; NaN too
    if (u < 0x38800000) { // below 2^-14: a subnormal half (or zero); the float add rounds it
        const a = @as(f32, @bitCast(u)) + 0.5; // lands the half's bits in the low mantissa bits of 0.5
        return @intCast(sign | (@as(u32, @bitCast(a)) - 0x3f000000));
    }
    u +%= 0xc8000fff + ((u >> 13) & 1); // rebias 127 -> 15, round to nearest even
    return @intCast(sign | (u >> 13));
}

/// n halves from s[i..] as floats: exact for every finite half.
inline fn loadF16(comptime n: usize, s: []const u16, i: usize) @Vector(n, f32) {
    const U = @Vector(n, u32);
    const h: U = @intCast(@as(@Vector(n, u16), s[i..][0..n].*));
    const mag: @Vector(n, f32) = @bitCast((h & @as(U, @splat(0x7fff))) << @splat(13));
    const f: U = @bitCast(mag * @as(@Vector(n, f32), @splat(0x1p112))); // rebias 15 -> 127
    return @bitCast(f | ((h & @as(U, @splat(0x8000))) << @splat(16)));
}

fn fromF16(h: u16) f32 {
    const mag: f32 = @bitCast(@as(u32, h & 0x7fff) << 13);
    const f: u32 = @bitCast(mag * 0x1p112);
    return @bitCast(f | (@as(u32, h & 0x8000) << 16));
}

/// q · k for one cached key, fp32 or fp16, in dot's order
inline fn dotCached(comptime T: type, q: []const f32, k: []const T) f32 {
    if (T == f32) return dot(q, k);
    // the 16 lanes as vectors of the CPU's width: a 16-wide conversion from
    // halves is lane-by-lane code under WebAssembly
    var acc: [16 / f32_lanes]F32s = @splat(@splat(0));
    var i: usize = 0;
    while (i + 16 <= k.len) : (i += 16) {
        inline for (&acc, 0..) |*a, p| a.* += load(q, i + p * f32_lanes) * loadF16(f32_lanes, k, i + p * f32_lanes);
    }
    var sum = fold16(@bitCast(acc));
    while (i < k.len) : (i += 1) sum += q[i] * fromF16(k[i]);
    return sum;
}

/// out += a * v for one cached value (each element on its own: any width)
inline fn axpyCached(comptime T: type, out: []f32, a: f32, v: []const T) void {
    const av: F32s = @splat(a);
    var i: usize = 0;
    while (i + f32_lanes <= out.len) : (i += f32_lanes) {
        const x = if (T == f32) load(v, i) else loadF16(f32_lanes, v, i);
        out[i..][0..f32_lanes].* = load(out, i) + av * x;
    }
    while (i < out.len) : (i += 1) out[i] += a * (if (T == f32) v[i] else fromF16(v[i]));
}

fn rmsnorm(out: []f32, x: []const f32, w: []const f32, eps: f32) void {
    const inv = 1.0 / @sqrt(dot(x, x) / @as(f32, @floatFromInt(x.len)) + eps);
    for (out, x, w) |*o, v, g| o.* = g * (inv * v);
}

/// e^x, as run.c's exp_fixed: 2^n · e^r with n = x / ln 2 rounded to an
/// integer, r = x - n ln 2 (ln 2 in two parts), and Cephes' degree-6 polynomial for
/// e^r (about 1 ulp), unfused. In vectors: LLVM would call a scalar expf per
/// lane instead (compiler_rt; under WebAssembly too), which cost more than the
/// matmuls in softmax over a 32000-token vocabulary. Inputs are clamped to
/// [-87, 88], where 2^n stays a normal float.
fn expVec(x_in: F32s) F32s {
    const x = clampVec(x_in, -87.0, 88.0);
    const rm: F32s = @splat(round_magic);
    const n = (x * @as(F32s, @splat(1.44269504088896341)) + rm) - rm; // rounded half to even
    var r = x - n * @as(F32s, @splat(0.693359375));
    r = r - n * @as(F32s, @splat(-2.12194440e-4));
    var p: F32s = @splat(1.9875691500e-4);
    inline for (.{ 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1 }) |c|
        p = p * r + @as(F32s, @splat(c));
    const e_r = p * (r * r) + (r + @as(F32s, @splat(1.0)));
    const two_n: F32s = @bitCast((@as(@Vector(f32_lanes, i32), @intFromFloat(n)) + @as(@Vector(f32_lanes, i32), @splat(127))) << @splat(23));
    return e_r * two_n;
}

/// max/min as compare and select: @max is IEEE maxNum (NaN-ignoring), which
/// WebAssembly's f32x4.max is not, so LLVM would call fmaxf per lane there.
inline fn maxVec(a: F32s, b: F32s) F32s {
    return @select(f32, a < b, b, a);
}

inline fn clampVec(x: F32s, lo: f32, hi: f32) F32s {
    const l: F32s = @splat(lo);
    const h: F32s = @splat(hi);
    const above = @select(f32, x < l, l, x);
    return @select(f32, above > h, h, above);
}

fn expScalar(x: f32) f32 {
    return expVec(@splat(x))[0];
}

/// The largest value of x (vectorised; -inf for an empty slice).
fn largest(x: []const f32) f32 {
    var i: usize = 0;
    var vmax: F32s = @splat(-std.math.inf(f32));
    while (i + f32_lanes <= x.len) : (i += f32_lanes) vmax = maxVec(vmax, load(x, i));
    var max = maxLane(vmax);
    for (x[i..]) |v| max = @max(max, v);
    return max;
}

fn softmax(x: []f32) void {
    const max = largest(x);
    const vm: F32s = @splat(max);
    var i: usize = 0;
    while (i + f32_lanes <= x.len) : (i += f32_lanes) x[i..][0..f32_lanes].* = expVec(load(x, i) - vm);
    for (x[i..]) |*v| v.* = expScalar(v.* - max);
    const inv: F32s = @splat(1.0 / sum16(x));
    i = 0;
    while (i + f32_lanes <= x.len) : (i += f32_lanes) x[i..][0..f32_lanes].* = load(x, i) * inv;
    for (x[i..]) |*v| v.* *= inv[0];
}

/// The largest lane (compare and select, as maxVec).
inline fn maxLane(v: F32s) f32 {
    var m = v[0];
    inline for (1..f32_lanes) |i| m = if (v[i] > m) v[i] else m;
    return m;
}

/// Round half to even, as C's lrintf: adding and subtracting 1.5 * 2^23 leaves
/// |v| < 2^22 rounded to an integer by the float adder itself (Zig does not
/// reassociate floats unless asked), in vectors on every target.
const round_magic: f32 = 12582912.0;

/// Symmetric Q8_0: per group, scale = max|x| / 127 and q = round(x / scale).
/// In vectors: scalar, with @max a libcall per value, it and argmax took ~12%
/// of a 15M int8 token under WebAssembly (vectorised: +8-12% wasmtime, +15% Chromium).
fn quantize(q: []i8, scales: []f32, x: []const f32, gs: usize) void {
    const rm: F32s = @splat(round_magic);
    for (scales, 0..) |*scale, g| {
        const xg = x[g * gs ..][0..gs];
        const qg = q[g * gs ..][0..gs];
        const vecs = gs - gs % f32_lanes;
        var vmax: F32s = @splat(0);
        var i: usize = 0;
        while (i < vecs) : (i += f32_lanes) vmax = maxVec(vmax, @abs(load(xg, i)));
        var amax = maxLane(vmax);
        for (xg[vecs..]) |v| amax = @max(amax, @abs(v));
        scale.* = amax / 127.0;
        const inv: f32 = if (scale.* > 0) 1.0 / scale.* else 0;
        i = 0;
        while (i < vecs) : (i += f32_lanes) {
            const r = (load(xg, i) * @as(F32s, @splat(inv)) + rm) - rm;
            const qv: @Vector(f32_lanes, i8) = @intFromFloat(r);
            qg[i..][0..f32_lanes].* = qv;
        }
        for (qg[vecs..], xg[vecs..]) |*qi, v| qi.* = @intFromFloat((v * inv + round_magic) - round_magic);
    }
}

/// fp32 kernel shape, measured: four streams (this share of rows in four
/// parts, walked side by side: a core's DRAM bandwidth grows with the
/// independent streams in flight). In run.c: 1.34-1.53x one row at a time on
/// AMD Zen 3 (AVX2), 1.04-1.10x four adjacent rows with software prefetch on
/// Zen 4 (AVX-512). Under WebAssembly two: four V16 sums do not fit in
/// wasmtime's registers.
const f32_streams = 4;

/// fp32 rows [lo, hi) of out = W x (W is rows × x.len).
fn matmulF32(out: []f32, x: []const f32, w: []const f32, lo: usize, hi: usize) void {
    const n = x.len;
    const q = (hi - lo) / f32_streams;
    const vecs = n - n % 16;
    for (lo..lo + q) |r| {
        var acc: [f32_streams]V16 = @splat(@splat(0));
        var j: usize = 0;
        while (j < vecs) : (j += 16) {
            const xv = load16(x, j);
            inline for (&acc, 0..) |*a, k| a.* += load16(w, (r + k * q) * n + j) * xv;
        }
        inline for (acc, 0..) |a, k| {
            var sum = fold16(a);
            for (w[(r + k * q) * n + vecs ..][0 .. n - vecs], x[vecs..]) |wv, xv| sum += wv * xv;
            out[r + k * q] = sum;
        }
    }
    for (lo + f32_streams * q..hi) |r| out[r] = dot(w[r * n ..][0..n], x);
}

const I8x32 = @Vector(32, i8);
const I32x8 = @Vector(8, i32);

/// One int8 row · x in the order every build keeps (run.c's q8_row): per
/// group, eight exact integer sums (byte j of the group into lane
/// (j % 32) / 4); lane l of eight float sums gains sum_l · (w_scale ·
/// x_scale); they fold as fold8.
/// (noinline: inlined into matmulQ8, its code made WebAssembly's kernel beside
/// it run at half speed under wasmtime)
noinline fn q8Row(xq: []const i8, xs: []const f32, wr: []const i8, ws: []const f32, gs: usize) f32 {
    var acc: F32x8 = @splat(0);
    for (ws, xs, 0..) |w_scale, x_scale, g| {
        const xg = xq[g * gs ..][0..gs];
        const wg = wr[g * gs ..][0..gs];
        const d = if (gs % 32 == 0) quadSums(xg, wg) else laneSums(xg, wg);
        acc += @as(F32x8, @floatFromInt(d)) * @as(F32x8, @splat(w_scale * x_scale));
    }
    return fold8(acc);
}

/// The eight lane sums of a group whose size is a multiple of 32, in vectors:
/// lane l takes the products of bytes 4l..4l+3 of every 32.
fn quadSums(x: []const i8, w: []const i8) I32x8 {
    const I32x32 = @Vector(32, i32);
    var d: I32x8 = @splat(0);
    var j: usize = 0;
    while (j < x.len) : (j += 32) {
        const xv: I8x32 = x[j..][0..32].*;
        const wv: I8x32 = w[j..][0..32].*;
        const p = @as(I32x32, xv) * @as(I32x32, wv);
        inline for (0..4) |b| {
            const lanes = comptime std.simd.iota(i32, 8) * @as(I32x8, @splat(4)) + @as(I32x8, @splat(b));
            d += @shuffle(i32, p, undefined, lanes);
        }
    }
    return d;
}

/// The eight lane sums of a group of any size, one byte at a time.
fn laneSums(x: []const i8, w: []const i8) I32x8 {
    var d: [8]i32 = @splat(0);
    for (x, w, 0..) |a, b, j| d[(j >> 2) & 7] += @as(i32, a) * b;
    return d;
}

/// vpdpbusd on 256-bit vectors (AVX-VNNI, or AVX-512 VNNI with VL): each i32
/// lane of acc gains the sum of four products of an unsigned byte of a and a
/// signed byte of b. LLVM picks the encoding the CPU has.
const has_vnni = builtin.cpu.arch == .x86_64 and
    (std.Target.x86.featureSetHas(builtin.cpu.features, .avxvnni) or
    (std.Target.x86.featureSetHas(builtin.cpu.features, .avx512vnni) and
    std.Target.x86.featureSetHas(builtin.cpu.features, .avx512vl)));
extern fn @"llvm.x86.avx512.vpdpbusd.256"(acc: I32x8, a: I32x8, b: I32x8) I32x8;

const has_simd128 = builtin.cpu.arch.isWasm() and
    std.Target.wasm.featureSetHas(builtin.cpu.features, .simd128);
const I32x4 = @Vector(4, i32);

const I8x16 = @Vector(16, i8);
const has_relaxed = has_simd128 and std.Target.wasm.featureSetHas(builtin.cpu.features, .relaxed_simd);
/// Relaxed SIMD's dot product: each i32 lane of c gains the sum of four
/// products of signed bytes of a and bytes of b, which must be 0..127 (then
/// every engine computes the same integers: the pair sums stay within i16).
extern fn @"llvm.wasm.relaxed.dot.i8x16.i7x16.add.signed"(a: I8x16, b: I8x16, c: I32x4) I32x4;

/// Streams of the WebAssembly int8 kernel: four, as the fp32 kernel.
const q8_wasm_streams = 4;

/// The int8 kernel for WebAssembly with relaxed SIMD, for group sizes that
/// are multiples of 32, as run.c's AVX2 kernel: |x| is the 0..127 side and
/// x's sign moves onto w; each lane of a dot sums four adjacent bytes, so the
/// two dots of every 32 bytes are q8Row's lanes 0-3 and 4-7. Streams (a part
/// of the rows each, as the fp32 kernel) share each load of x. Returns the
/// first row not done.
fn matmulQ8Relaxed(out: []f32, xq: []const i8, xs: []const f32, wq: []const i8, ws: []const f32, gs: usize, lo: usize, hi: usize) usize {
    const S = q8_wasm_streams;
    const n = xq.len;
    const ng = n / gs;
    const q = (hi - lo) / S;
    for (lo..lo + q) |r| {
        var acc: [S]F32x8 = @splat(@splat(0));
        for (0..ng) |g| {
            var d: [S][2]I32x4 = @splat(@splat(@splat(0))); // lanes 0-3 and 4-7
            var j = g * gs;
            while (j < (g + 1) * gs) : (j += 32) {
                inline for (0..2) |half| {
                    const xv: I8x16 = xq[j + 16 * half ..][0..16].*;
                    const sign = xv >> @splat(7); // -1 where x < 0
                    const ax: I8x16 = @bitCast(@abs(xv));
                    inline for (&d, 0..) |*dk, k| {
                        const wv: I8x16 = wq[(r + k * q) * n + j + 16 * half ..][0..16].*;
                        dk[half] = @"llvm.wasm.relaxed.dot.i8x16.i7x16.add.signed"((wv ^ sign) -% sign, ax, dk[half]);
                    }
                }
            }
            inline for (&acc, d, 0..) |*a, dk, k| {
                const lanes: I32x8 = @shuffle(i32, dk[0], dk[1], [8]i32{ 0, 1, 2, 3, -1, -2, -3, -4 });
                a.* += @as(F32x8, @floatFromInt(lanes)) * @as(F32x8, @splat(ws[(r + k * q) * ng + g] * xs[g]));
            }
        }
        inline for (acc, 0..) |a, k| out[r + k * q] = fold8(a);
    }
    return lo + S * q;
}

const has_avx2 = builtin.cpu.arch == .x86_64 and
    std.Target.x86.featureSetHas(builtin.cpu.features, .avx2);
/// AVX2's pmaddubsw (unsigned × signed bytes, adjacent pairs summed to i16),
/// pmaddwd (i16 × i16, pairs summed to i32) and psignb (a negated where b < 0,
/// zeroed where b == 0).
extern fn @"llvm.x86.avx2.pmadd.ub.sw"(a: I8x32, b: I8x32) @Vector(16, i16);
extern fn @"llvm.x86.avx2.pmadd.wd"(a: @Vector(16, i16), b: @Vector(16, i16)) I32x8;
extern fn @"llvm.x86.avx2.psign.b"(a: I8x32, b: I8x32) I8x32;

/// The int8 kernel for x86 CPUs with AVX2 (AVX-512 ones too: in run.c on
/// Zen 4, 1.16-1.44x four adjacent rows of 512-bit VNNI), as run.c's: four
/// rows per pass share each load of x, rows r, r + stride, r + 2 stride,
/// r + 3 stride (four streams), each prefetched `ahead` rows on. |x| is the
/// unsigned side and x's sign moves onto w; without VNNI, the i16 pair sums
/// stay below 2 * 127 * 127, so never saturate. Lane l of a dot holds bytes
/// 4l..4l+3 of every 32: q8Row's lanes. `rows` is 4, or 1 for the last rows.
fn q8RowsAvx2(out: []f32, xq: []const i8, xs: []const f32, wq: []const i8, ws: []const f32, gs: usize, r: usize, comptime rows: usize, stride: usize, ahead: usize) void {
    const n = xq.len;
    const ng = n / gs;
    const ones: @Vector(16, i16) = @splat(1);
    var acc: [rows]F32x8 = @splat(@splat(0));
    // the scales of the row `ahead` on, which the weights' prefetch does not
    // reach (one or two cache lines): +1-4% in run.c (A/B, token by token)
    inline for (0..rows) |k| {
        const s = ws.ptr + (r + k * stride + ahead) * ng;
        @prefetch(s, .{});
        @prefetch(s + ng - 1, .{});
    }
    var j: usize = 0;
    for (0..ng) |g| {
        var dots: [rows]I32x8 = @splat(@splat(0));
        const end = j + gs;
        while (j < end) : (j += 32) {
            const xv: I8x32 = xq[j..][0..32].*;
            const ax = @"llvm.x86.avx2.psign.b"(xv, xv);
            inline for (&dots, 0..) |*d, k| {
                const row = (r + k * stride) * n;
                // a prefetch never faults: past the matrix's end it is only wasted
                @prefetch(wq.ptr + row + ahead * n + j, .{});
                const wv: I8x32 = wq[row + j ..][0..32].*;
                const signed = @"llvm.x86.avx2.psign.b"(wv, xv);
                if (has_vnni) {
                    d.* = @"llvm.x86.avx512.vpdpbusd.256"(d.*, @bitCast(ax), @bitCast(signed));
                } else {
                    d.* += @"llvm.x86.avx2.pmadd.wd"(@"llvm.x86.avx2.pmadd.ub.sw"(ax, signed), ones);
                }
            }
        }
        inline for (&acc, dots, 0..) |*a, d, k| {
            const sc: F32x8 = @splat(ws[(r + k * stride) * ng + g] * xs[g]);
            a.* += @as(F32x8, @floatFromInt(d)) * sc;
        }
    }
    inline for (acc, 0..) |a, k| out[r + k * stride] = fold8(a);
}

/// int8 rows [lo, hi) of out = W x with x already quantized to (xq, xs).
fn matmulQ8(out: []f32, xq: []const i8, xs: []const f32, wq: []const i8, ws: []const f32, gs: usize, lo: usize, hi: usize) void {
    const n = xq.len;
    const ng = n / gs;
    var r = lo;
    if (has_avx2 and gs % 32 == 0) { // four streams, each a quarter of our share
        const q = (hi - lo) / 4;
        while (r < lo + q) : (r += 1) q8RowsAvx2(out, xq, xs, wq, ws, gs, r, 4, q, 4);
        r = lo + 4 * q;
        while (r < hi) : (r += 1) q8RowsAvx2(out, xq, xs, wq, ws, gs, r, 1, 1, 4);
    } else if (has_relaxed and gs % 32 == 0) {
        r = matmulQ8Relaxed(out, xq, xs, wq, ws, gs, lo, hi);
    }
    while (r < hi) : (r += 1) out[r] = q8Row(xq, xs, wq[r * n ..][0..n], ws[r * ng ..][0..ng], gs);
}

// ------------------------------------------------------------------ forward pass: the jobs

/// A slice of the work: part `index` of `count` (one per thread).
pub const Part = struct {
    index: usize,
    count: usize,
    /// count + 1 fractions: part i's rows are [cut[i], cut[i + 1]) of each
    /// matrix (Pool.rebalance); null: equal parts
    cut: ?[]const f64 = null,

    /// This part of n rows: contiguous, cut on multiples of 4 so the
    /// four-row kernels and RoPE pairs never straddle threads.
    fn rows(p: Part, n: usize) struct { usize, usize } {
        const blocks = (n + 3) / 4;
        return .{ @min(n, 4 * p.blockEdge(blocks, p.index)), @min(n, 4 * p.blockEdge(blocks, p.index + 1)) };
    }

    /// Where part i's blocks begin.
    fn blockEdge(p: Part, blocks: usize, i: usize) usize {
        if (p.cut) |cut| return @intFromFloat(@as(f64, @floatFromInt(blocks)) * cut[i] + 0.5);
        return blocks * i / p.count;
    }
};

const Step = struct { t: *Transformer, layer: usize, pos: usize };
const Job = fn (Step, Part) void;

/// Rotate pairs (i, i+1) of x[lo..hi) by this position's angles.
fn rope(x: []f32, lo: usize, hi: usize, hs: usize, cos: []const f32, sin: []const f32) void {
    var i = lo;
    while (i < hi) : (i += 2) {
        const c = cos[(i % hs) / 2];
        const s = sin[(i % hs) / 2];
        const x0 = x[i];
        const x1 = x[i + 1];
        x[i] = x0 * c - x1 * s;
        x[i + 1] = x0 * s + x1 * c;
    }
}

/// Head `kv_head`'s keys (or values) in a layer's KV cache: seq_len × hs.
fn headCache(comptime T: type, t: *Transformer, cache: []T, layer: usize, kv_head: usize) []T {
    const c = t.config;
    const n = c.seq_len * c.headSize();
    return cache[(layer * c.n_kv_heads + kv_head) * n ..][0..n];
}

/// q, k and v for this position, with RoPE; k and v then go into each head's cache.
fn attentionInputs(st: Step, part: Part) void {
    const t = st.t;
    const s = &t.state;
    const layer = &t.layers[st.layer];
    const hs = t.config.headSize();
    const cos = s.rope_cos[st.pos * (hs / 2) ..][0 .. hs / 2];
    const sin = s.rope_sin[st.pos * (hs / 2) ..][0 .. hs / 2];
    const qa, const qb = part.rows(t.config.dim);
    t.matmul(s.q, layer.wq, s.xb, qa, qb);
    rope(s.q, qa, qb, hs, cos, sin);
    const ka, const kb = part.rows(s.k.len);
    t.matmul(s.k, layer.wk, s.xb, ka, kb);
    t.matmul(s.v, layer.wv, s.xb, ka, kb);
    rope(s.k, ka, kb, hs, cos, sin);
    for (ka..kb) |r| {
        const i = st.pos * hs + r % hs;
        if (s.key_cache16.len > 0) {
            headCache(u16, t, s.key_cache16, st.layer, r / hs)[i] = toF16(s.k[r]);
            headCache(u16, t, s.value_cache16, st.layer, r / hs)[i] = toF16(s.v[r]);
        } else {
            headCache(f32, t, s.key_cache, st.layer, r / hs)[i] = s.k[r];
            headCache(f32, t, s.value_cache, st.layer, r / hs)[i] = s.v[r];
        }
    }
}

/// Causal attention over positions 0..pos, heads split over the parts; out into xb.
fn attention(st: Step, part: Part) void {
    const s = &st.t.state;
    if (s.key_cache16.len > 0) attendHeads(u16, st, part, s.key_cache16, s.value_cache16) else attendHeads(f32, st, part, s.key_cache, s.value_cache);
}

fn attendHeads(comptime T: type, st: Step, part: Part, key_cache: []T, value_cache: []T) void {
    const t = st.t;
    const c = t.config;
    const s = &t.state;
    const hs = c.headSize();
    const group = c.n_heads / c.n_kv_heads;
    const scale = 1.0 / @sqrt(@as(f32, @floatFromInt(hs)));
    const end = c.n_heads * (part.index + 1) / part.count;
    for (c.n_heads * part.index / part.count..end) |h| {
        const q = s.q[h * hs ..][0..hs];
        const att = s.att[h * c.seq_len ..][0 .. st.pos + 1];
        const keys = headCache(T, t, key_cache, st.layer, h / group);
        const values = headCache(T, t, value_cache, st.layer, h / group);
        // a head's keys and values are short streams the hardware prefetcher
        // meets cold: fetch the values while reading the keys, and the next
        // head's keys (unless it shares these) while reading the values (as run.c)
        const next_keys = if (h + 1 < end and (h + 1) / group != h / group)
            headCache(T, t, key_cache, st.layer, (h + 1) / group)
        else
            null;
        for (att, 0..) |*a, p| {
            prefetchRow(T, values[p * hs ..][0..hs]);
            a.* = dotCached(T, q, keys[p * hs ..][0..hs]) * scale;
        }
        softmax(att);
        attendValues(T, s.xb[h * hs ..][0..hs], att, values, next_keys);
    }
}

/// o = the sum over positions p of att[p] * (the value at p); prefetches the
/// next head's keys as it goes. Element by element the same chain of
/// multiply-adds as axpyCached from o = 0 (the same bits); for the usual head
/// sizes the sums stay in registers across positions instead of a load and a
/// store of o per position (as run.c).
fn attendValues(comptime T: type, o: []f32, att: []const f32, values: []const T, next_keys: ?[]const T) void {
    const hs = o.len;
    switch (hs) {
        inline 32, 48, 64, 128 => |n| if (n % f32_lanes == 0 and n / f32_lanes <= 16)
            return attendValuesN(T, n, o, att, values, next_keys),
        else => {},
    }
    @memset(o, 0);
    for (att, 0..) |a, p| {
        if (next_keys) |nk| prefetchRow(T, nk[p * hs ..][0..hs]);
        axpyCached(T, o, a, values[p * hs ..][0..hs]);
    }
}

fn attendValuesN(comptime T: type, comptime n: usize, o: []f32, att: []const f32, values: []const T, next_keys: ?[]const T) void {
    const nv = n / f32_lanes;
    var acc: [nv]F32s = undefined;
    inline for (0..nv) |j| acc[j] = @splat(0);
    for (att, 0..) |a, p| {
        if (next_keys) |nk| prefetchRow(T, nk[p * n ..][0..n]);
        const av: F32s = @splat(a);
        const row = values[p * n ..][0..n];
        inline for (0..nv) |j| {
            const x = if (T == f32) load(row, j * f32_lanes) else loadF16(f32_lanes, row, j * f32_lanes);
            acc[j] += av * x;
        }
    }
    inline for (0..nv) |j| o[j * f32_lanes ..][0..f32_lanes].* = acc[j];
}

/// A prefetch per cache line of `row` (WebAssembly has none: a no-op there).
inline fn prefetchRow(comptime T: type, row: []const T) void {
    var i: usize = 0;
    while (i < row.len) : (i += 64 / @sizeOf(T)) @prefetch(row[i..].ptr, .{});
}

fn attentionOutput(st: Step, part: Part) void {
    const t = st.t;
    const a, const b = part.rows(t.config.dim);
    t.matmul(t.state.xb2, t.layers[st.layer].wo, t.state.xb, a, b);
}

/// SwiGLU: silu(w1 x) * (w3 x), each part on its own rows.
fn feedForwardIn(st: Step, part: Part) void {
    const t = st.t;
    const s = &t.state;
    const layer = &t.layers[st.layer];
    const a, const b = part.rows(t.config.hidden_dim);
    t.matmul(s.hb, layer.w1, s.xb, a, b);
    t.matmul(s.hb2, layer.w3, s.xb, a, b);
    var i = a;
    while (i + f32_lanes <= b) : (i += f32_lanes) {
        const h = load(s.hb, i);
        s.hb[i..][0..f32_lanes].* = h / (@as(F32s, @splat(1.0)) + expVec(-h)) * load(s.hb2, i);
    }
    for (s.hb[i..b], s.hb2[i..b]) |*h, g| h.* = h.* / (1.0 + expScalar(-h.*)) * g;
}

fn feedForwardOut(st: Step, part: Part) void {
    const t = st.t;
    const a, const b = part.rows(t.config.dim);
    t.matmul(t.state.xb2, t.layers[st.layer].w2, t.state.hb, a, b);
}

fn classify(st: Step, part: Part) void {
    const t = st.t;
    const a, const b = part.rows(t.config.vocab_size);
    t.matmul(t.state.logits, t.classifier, t.state.x, a, b);
}

// ------------------------------------------------------------------ thread pool

/// The browser module built with threads (run_web.zig): there the pool's
/// helpers are Web Workers that JavaScript starts on the module's shared
/// memory, each one calling Pool.serve. The browser has no std.Thread and no
/// Io, so the pool sleeps and wakes with WebAssembly's own atomics and reads
/// the page's clock.
const in_browser = builtin.cpu.arch.isWasm() and !builtin.single_threaded;
extern fn @"llvm.wasm.memory.atomic.wait32"(ptr: *const u32, expected: u32, timeout_ns: i64) i32;
extern fn @"llvm.wasm.memory.atomic.notify"(ptr: *const u32, waiters: u32) u32;
/// performance.now(): milliseconds, imported from JavaScript
extern "env" fn now() f64;

/// Workers that run one job at a time with the calling thread, each on its
/// own Part. They spin briefly between jobs (a token is ~30 jobs in quick
/// succession), then sleep on a futex.
pub const Pool = struct {
    gpa: Allocator,
    io: Io, // native builds only
    threads: []std.Thread, // the workers it started (none in the browser)
    helpers: usize, // threads besides the caller
    generation: std.atomic.Value(u32) = .init(0),
    pending: std.atomic.Value(u32) = .init(0),
    quit: bool = false,
    job: *const Job = undefined,
    step: Step = undefined,
    timed: bool = false, // the job splits rows at cut: its time counts in busy
    cut: []f64, // threads + 1 fractions, see rebalance
    busy: []i64, // per thread: nanoseconds in row-split jobs this token

    // In the browser a sleep and its wake-up go through V8's futex emulation,
    // slower than Linux's futex: spinning up to ~1 ms there gave 1.30-1.48x
    // over 1 thread at 15M in Chromium, against 1.28-1.39x with the native count.
    const spins = if (in_browser) 1 << 20 else 1 << 14;

    /// A pool of n threads, the caller included. In the browser (io unused)
    /// JavaScript starts the n - 1 helpers: see run_web.zig.
    pub fn init(gpa: Allocator, io: Io, n: usize) error{ OutOfMemory, SystemResources }!*Pool {
        const pool = try gpa.create(Pool);
        errdefer gpa.destroy(pool);
        pool.* = .{ .gpa = gpa, .io = io, .threads = &.{}, .helpers = n - 1, .cut = &.{}, .busy = &.{} };
        try pool.allocShares();
        errdefer pool.freeShares();
        if (!in_browser) {
            pool.threads = try gpa.alloc(std.Thread, n - 1);
            errdefer gpa.free(pool.threads);
            for (pool.threads, 0..) |*th, i| {
                th.* = std.Thread.spawn(.{}, serve, .{ pool, i + 1 }) catch {
                    pool.stop(pool.threads[0..i]);
                    return error.SystemResources;
                };
            }
        }
        return pool;
    }

    fn allocShares(pool: *Pool) Allocator.Error!void {
        const n = pool.helpers + 1;
        pool.cut = try pool.gpa.alloc(f64, n + 1);
        errdefer pool.gpa.free(pool.cut);
        pool.busy = try pool.gpa.alloc(i64, n);
        for (pool.cut, 0..) |*c, i| c.* = @as(f64, @floatFromInt(i)) / @as(f64, @floatFromInt(n));
        @memset(pool.busy, 0);
    }

    fn freeShares(pool: *Pool) void {
        pool.gpa.free(pool.cut);
        pool.gpa.free(pool.busy);
    }

    pub fn deinit(pool: *Pool) void {
        pool.stop(pool.threads);
        pool.gpa.free(pool.threads);
        pool.freeShares();
        pool.gpa.destroy(pool);
    }

    /// Ask the workers to return; native builds wait for them.
    fn stop(pool: *Pool, started: []std.Thread) void {
        pool.quit = true;
        _ = pool.generation.fetchAdd(1, .release);
        pool.wake(&pool.generation.raw, std.math.maxInt(u32));
        if (!in_browser) for (started) |th| th.join();
    }

    fn wait(pool: *Pool, ptr: *const u32, expected: u32) void {
        if (in_browser) {
            _ = @"llvm.wasm.memory.atomic.wait32"(ptr, expected, -1);
        } else pool.io.futexWaitUncancelable(u32, ptr, expected);
    }

    fn wake(pool: *Pool, ptr: *const u32, waiters: u32) void {
        if (in_browser) {
            _ = @"llvm.wasm.memory.atomic.notify"(ptr, waiters);
        } else pool.io.futexWake(u32, ptr, waiters);
    }

    fn nanoseconds(pool: *Pool) i64 {
        if (in_browser) return @intFromFloat(now() * 1e6);
        return @intCast(Io.Timestamp.now(pool.io, .awake).nanoseconds);
    }

    fn run(pool: *Pool, step: Step, comptime job: Job) void {
        pool.job = &job;
        pool.step = step;
        pool.timed = job != attention;
        pool.pending.store(@intCast(pool.helpers), .monotonic);
        _ = pool.generation.fetchAdd(1, .release);
        pool.wake(&pool.generation.raw, std.math.maxInt(u32));
        pool.runPart(0);
        var n: usize = 0;
        while (true) : (n += 1) {
            const left = pool.pending.load(.acquire);
            if (left == 0) break;
            if (n < spins) std.atomic.spinLoopHint() else pool.wait(&pool.pending.raw, left);
        }
    }

    fn runPart(pool: *Pool, index: usize) void {
        const start = if (pool.timed) pool.nanoseconds() else 0;
        pool.job(pool.step, .{ .index = index, .count = pool.helpers + 1, .cut = pool.cut });
        if (pool.timed) pool.busy[index] += pool.nanoseconds() - start;
    }

    /// After a token: each thread's share of the rows per busy second is its
    /// speed now (on a shared host one core is often slower for a while);
    /// new shares follow the speeds, averaged with the old ones so one noisy
    /// token cannot swing them. As run.c's rebalance; which thread computes
    /// a row never changes its value.
    fn rebalance(pool: *Pool) void {
        defer @memset(pool.busy, 0);
        var total: f64 = 0;
        for (pool.busy, 0..) |b, i| {
            if (b <= 0) return;
            total += (pool.cut[i + 1] - pool.cut[i]) / @as(f64, @floatFromInt(b));
        }
        var lo: f64 = 0; // the old cut[i], before it is overwritten
        var acc: f64 = 0;
        for (pool.busy[0 .. pool.busy.len - 1], 1..) |b, i| {
            const share = pool.cut[i] - lo;
            lo = pool.cut[i];
            acc += 0.5 * share + 0.5 * share / @as(f64, @floatFromInt(b)) / total;
            pool.cut[i] = acc;
        }
    }

    /// Worker `index`'s loop (1 ..= helpers): run each job's part until stop.
    pub fn serve(pool: *Pool, index: usize) void {
        var seen: u32 = 0;
        while (true) {
            var n: usize = 0;
            while (true) : (n += 1) {
                const gen = pool.generation.load(.acquire);
                if (gen != seen) {
                    seen = gen;
                    break;
                }
                if (n < spins) std.atomic.spinLoopHint() else pool.wait(&pool.generation.raw, seen);
            }
            if (pool.quit) return;
            pool.runPart(index);
            if (pool.pending.fetchSub(1, .acq_rel) == 1) pool.wake(&pool.pending.raw, 1);
        }
    }
};

// ------------------------------------------------------------------ tokenizer

const max_piece = 65536;

pub const Tokenizer = struct {
    gpa: Allocator,
    bytes: []u8, // our copy of tokenizer.bin; pieces point into it
    pieces: [][]const u8,
    scores: []f32,
    byte_of: []?u8, // "<0xNN>" pieces: the byte NN
    sorted: []u32, // ids ordered by piece bytes, for binary search
    merge_buf: []u8, // two pieces side by side

    /// The checks on tokenizer.bin's first 4 bytes (`head`: max_token_length,
    /// which it returns) and its size, which need nothing else: a file holds at
    /// most vocab_size pieces of at most max_token_length bytes.
    pub fn checkSize(head: []const u8, size: u64, vocab_size: usize, name: []const u8, diag: *Diagnostic) Error!usize {
        if (vocab_size < 3 or vocab_size > max_vocab)
            return diag.fail(error.BadTokenizer, "{s}: vocab_size {d} is not usable (need 3..{d})", .{ name, vocab_size, max_vocab });
        if (size < 4) return diag.fail(error.BadTokenizer, "{s}: file is {d} bytes, cut off inside the header", .{ name, size });
        const header_max = readInt(i32, head, 0);
        if (header_max <= 0 or header_max > max_piece)
            return diag.fail(error.BadTokenizer, "{s}: bad header: max_token_length {d} (must be 1..{d})", .{ name, header_max, max_piece });
        const most = 4 + @as(u64, vocab_size) * (8 + @as(u64, @intCast(header_max)));
        if (size > most)
            return diag.fail(error.BadTokenizer, "{s}: file is {d} bytes, more than {d} pieces of at most max_token_length {d} bytes fill ({d}): it does not fit the model's vocab_size {d}", .{ name, size, vocab_size, header_max, most, vocab_size });
        return @intCast(header_max);
    }

    /// Parse tokenizer.bin; it must hold exactly `vocab_size` pieces.
    pub fn init(gpa: Allocator, data: []const u8, vocab_size: usize, name: []const u8, diag: *Diagnostic) Error!Tokenizer {
        if (data.len == 0) return diag.fail(error.BadTokenizer, "{s}: file is empty", .{name});
        const header_max = try checkSize(data, data.len, vocab_size, name, diag);
        // first pass: validate and measure
        var off: usize = 4;
        var longest: usize = 1;
        for (0..vocab_size) |i| {
            if (data.len - off < 8)
                return diag.fail(error.BadTokenizer, "{s}: cut off at piece {d} of {d} (the model's vocab_size is {d})", .{ name, i, vocab_size, vocab_size });
            const len = readInt(i32, data, off + 4);
            if (len < 0 or len > header_max)
                return diag.fail(error.BadTokenizer, "{s}: piece {d} has bad length {d} (must be 0..max_token_length {d})", .{ name, i, len, header_max });
            if (@as(usize, @intCast(len)) > data.len - off - 8)
                return diag.fail(error.BadTokenizer, "{s}: cut off inside piece {d} of {d} (the model's vocab_size is {d})", .{ name, i, vocab_size, vocab_size });
            off += 8 + @as(usize, @intCast(len));
            longest = @max(longest, @as(usize, @intCast(len)));
        }
        if (off != data.len)
            return diag.fail(error.BadTokenizer, "{s}: {d} bytes left over after {d} pieces: it does not fit the model's vocab_size {d}", .{ name, data.len - off, vocab_size, vocab_size });

        const bytes = try gpa.dupe(u8, data);
        errdefer gpa.free(bytes);
        const pieces = try gpa.alloc([]const u8, vocab_size);
        errdefer gpa.free(pieces);
        const scores = try gpa.alloc(f32, vocab_size);
        errdefer gpa.free(scores);
        const byte_of = try gpa.alloc(?u8, vocab_size);
        errdefer gpa.free(byte_of);
        const sorted = try gpa.alloc(u32, vocab_size);
        errdefer gpa.free(sorted);
        const merge_buf = try gpa.alloc(u8, 2 * longest);
        off = 4;
        for (pieces, scores, byte_of, sorted, 0..) |*piece, *score, *byte, *id, i| {
            const len: usize = @intCast(readInt(i32, bytes, off + 4));
            score.* = @bitCast(readInt(u32, bytes, off));
            piece.* = bytes[off + 8 ..][0..len];
            byte.* = parseBytePiece(piece.*);
            id.* = @intCast(i);
            off += 8 + len;
        }
        std.mem.sort(u32, sorted, pieces, struct {
            fn lessThan(p: [][]const u8, a: u32, b: u32) bool {
                return std.mem.order(u8, p[a], p[b]) == .lt;
            }
        }.lessThan);
        return .{ .gpa = gpa, .bytes = bytes, .pieces = pieces, .scores = scores, .byte_of = byte_of, .sorted = sorted, .merge_buf = merge_buf };
    }

    pub fn deinit(t: *Tokenizer) void {
        inline for (.{ t.bytes, t.pieces, t.scores, t.byte_of, t.sorted, t.merge_buf }) |owned| t.gpa.free(owned);
        t.* = undefined;
    }

    pub fn vocabSize(t: *const Tokenizer) usize {
        return t.pieces.len;
    }

    fn parseBytePiece(p: []const u8) ?u8 {
        if (p.len != 6 or !std.mem.startsWith(u8, p, "<0x") or p[5] != '>') return null;
        return std.fmt.parseInt(u8, p[3..5], 16) catch null;
    }

    /// The id of the piece with exactly these bytes.
    pub fn lookup(t: *const Tokenizer, s: []const u8) ?u32 {
        const i = std.sort.binarySearch(u32, t.sorted, Key{ .pieces = t.pieces, .s = s }, Key.compare) orelse return null;
        return t.sorted[i];
    }

    const Key = struct {
        pieces: []const []const u8,
        s: []const u8,
        fn compare(k: Key, id: u32) std.math.Order {
            return std.mem.order(u8, k.s, k.pieces[id]);
        }
    };

    fn pairId(t: *Tokenizer, a: u32, b: u32) ?u32 {
        const pa = t.pieces[a];
        const pb = t.pieces[b];
        @memcpy(t.merge_buf[0..pa.len], pa);
        @memcpy(t.merge_buf[pa.len..][0..pb.len], pb);
        return t.lookup(t.merge_buf[0 .. pa.len + pb.len]);
    }

    /// llama2.c's encoding: BOS, a dummy-prefix space, code points with byte
    /// fallback (id = byte + 3), then merges of the best-scoring adjacent pair
    /// (leftmost wins ties, as in SentencePiece). Caller frees the ids.
    pub fn encode(t: *Tokenizer, gpa: Allocator, text: []const u8, add_bos: bool, add_eos: bool, diag: *Diagnostic) Error![]u32 {
        var ids: std.ArrayList(u32) = .empty;
        defer ids.deinit(gpa);
        if (text.len > 0) if (t.lookup(" ")) |space| try ids.append(gpa, space);
        var i: usize = 0;
        while (i < text.len) {
            const n = utf8Length(text[i..]);
            // U+2581 "▁" is SentencePiece's space marker, stored as a space
            const is_marker = std.mem.eql(u8, text[i..][0..n], "\u{2581}");
            if (t.lookup(if (is_marker) " " else text[i..][0..n])) |id| {
                try ids.append(gpa, id);
            } else for (text[i..][0..n]) |byte| {
                if (@as(usize, byte) + 3 >= t.vocabSize())
                    return diag.fail(error.BadInput, "encode: byte 0x{x:0>2} has no byte-fallback piece in a {d}-piece vocabulary", .{ byte, t.vocabSize() });
                try ids.append(gpa, @as(u32, byte) + 3);
            }
            i += n;
        }
        // merge; after each merge only the two neighbouring pairs change
        if (ids.items.len >= 2) {
            var pairs: std.ArrayList(?u32) = .empty;
            defer pairs.deinit(gpa);
            for (ids.items[0 .. ids.items.len - 1], ids.items[1..]) |a, b| try pairs.append(gpa, t.pairId(a, b));
            while (true) {
                var best: ?usize = null;
                var best_score: f32 = 0;
                for (pairs.items, 0..) |pair, k| if (pair) |id| {
                    if (best == null or t.scores[id] > best_score) {
                        best = k;
                        best_score = t.scores[id];
                    }
                };
                const k = best orelse break;
                ids.items[k] = pairs.items[k].?;
                _ = ids.orderedRemove(k + 1);
                _ = pairs.orderedRemove(if (k + 1 < pairs.items.len) k + 1 else k);
                if (k > 0) pairs.items[k - 1] = t.pairId(ids.items[k - 1], ids.items[k]);
                if (k + 1 < ids.items.len) pairs.items[k] = t.pairId(ids.items[k], ids.items[k + 1]);
            }
        }
        if (add_bos) try ids.insert(gpa, 0, bos);
        if (add_eos) try ids.append(gpa, eos);
        return ids.toOwnedSlice(gpa);
    }

    /// The bytes `token` stands for after `prev` (null: start of output), as
    /// llama2.c's decode has them (print them if `printable`): the piece as a
    /// C string (up to any NUL byte), without its leading space at the start
    /// and after BOS; a piece that C's sscanf reads as "<0x%02hhX>" is that
    /// one byte. BOS and EOS are their pieces, as any token.
    pub fn decode(t: *const Tokenizer, prev: ?u32, token: u32) []const u8 {
        if (token >= t.vocabSize()) return "";
        var p = cString(t.pieces[token]);
        if ((prev == null or prev == bos) and p.len > 0 and p[0] == ' ') p = p[1..];
        if (scanBytePiece(p)) |b| p = cString(byte_strings[b .. @as(usize, b) + 1]);
        return p;
    }
};

const byte_strings: [256]u8 = blk: {
    var all: [256]u8 = undefined;
    for (&all, 0..) |*b, i| b.* = i;
    break :blk all;
};

/// Length of the valid UTF-8 sequence at the start of s (1..4), or 1 for an
/// invalid byte, which then goes through byte fallback like any unknown character.
fn utf8Length(s: []const u8) usize {
    const n = std.unicode.utf8ByteSequenceLength(s[0]) catch return 1;
    if (n == 1 or n > s.len) return 1;
    _ = std.unicode.utf8Decode(s[0..n]) catch return 1; // overlong, surrogate, out of range
    return n;
}

fn cString(s: []const u8) []const u8 {
    return s[0 .. std.mem.indexOfScalar(u8, s, 0) orelse s.len];
}

/// The byte that C's sscanf(p, "<0x%02hhX>", &byte) reads, if it reads one:
/// after "<0x" and any whitespace, at most two characters of a hexadecimal
/// number, which may have a sign, and "0x" (read as 0); the ">" is not checked.
fn scanBytePiece(p: []const u8) ?u8 {
    if (!std.mem.startsWith(u8, p, "<0x")) return null;
    var i: usize = 3;
    while (i < p.len and isCSpace(p[i])) i += 1;
    var width: usize = 2;
    const negative = i < p.len and p[i] == '-';
    if (i < p.len and (p[i] == '+' or p[i] == '-')) {
        i += 1;
        width -= 1;
    }
    if (width == 2 and i + 1 < p.len and p[i] == '0' and (p[i + 1] | 0x20) == 'x') return 0;
    var digits: usize = 0;
    var value: u8 = 0;
    while (digits < width and i + digits < p.len) : (digits += 1)
        value = value * 16 + (std.fmt.charToDigit(p[i + digits], 16) catch break);
    if (digits == 0) return null;
    return if (negative) 0 -% value else value;
}

/// isspace in the C locale
fn isCSpace(c: u8) bool {
    return c == ' ' or (c >= '\t' and c <= '\r');
}

/// Whether llama2.c's safe_printf prints a piece: not an empty one, and one
/// of one byte only if it is printable or whitespace in the C locale (so not
/// control bytes, nor lone bytes >= 0x80: UTF-8 spelt out in byte pieces).
pub fn printable(piece: []const u8) bool {
    if (piece.len != 1) return piece.len > 0;
    const c = piece[0];
    return (c >= ' ' and c <= '~') or isCSpace(c);
}

// ------------------------------------------------------------------ sampler

/// llama2.c's sampler, to the bit: the same xorshift64* stream from the seed
/// as given, the same probabilities (its softmax, with the C library's expf),
/// and the same walks over them, so that a seed picks llama2.c's tokens.
pub const Sampler = struct {
    temperature: f32,
    topp: f32,
    rng: u64,
    buf: []f32, // vocab_size floats, for top-p's threshold
    keys: []u64, // 2 × vocab_size, top-p's candidates (see candidateKey) and sortKeys' room

    /// seed: xorshift64*'s first state, as llama2.c's -s. The command line
    /// and the page take 0 to mean the clock, as llama2.c does; given 0 here
    /// (from which xorshift would stay at 0) it starts from run.c's library's
    /// fixed state.
    pub fn init(gpa: Allocator, vocab_size: usize, temperature: f32, topp: f32, seed: u64) Allocator.Error!Sampler {
        const buf = try gpa.alloc(f32, vocab_size);
        errdefer gpa.free(buf);
        const keys = try gpa.alloc(u64, 2 * vocab_size);
        const rng = if (seed != 0) seed else 0x9E3779B97F4A7C15;
        return .{ .temperature = temperature, .topp = topp, .rng = rng, .buf = buf, .keys = keys };
    }

    pub fn deinit(s: *Sampler, gpa: Allocator) void {
        gpa.free(s.buf);
        gpa.free(s.keys);
    }

    /// xorshift64*
    fn nextU32(s: *Sampler) u32 {
        s.rng ^= s.rng >> 12;
        s.rng ^= s.rng << 25;
        s.rng ^= s.rng >> 27;
        return @truncate((s.rng *% 0x2545F4914F6CDD1D) >> 32);
    }

    /// Uniform in [0, 1).
    fn nextF32(s: *Sampler) f32 {
        return @as(f32, @floatFromInt(s.nextU32() >> 8)) / 16777216.0;
    }

    /// The next token from these (finite) logits, which it overwrites; an
    /// error when dividing them by the temperature overflows.
    pub fn sample(s: *Sampler, logits: []f32, diag: *Diagnostic) Error!u32 {
        if (s.temperature == 0) return argmax(logits);
        for (logits) |*l| l.* /= s.temperature;
        if (firstNonFinite(logits) != null)
            return diag.fail(error.BadInput, "temperature too low: the logits divided by it are not finite (NaN or infinity)", .{});
        probabilities(logits);
        const coin = s.nextF32();
        if (s.topp <= 0 or s.topp >= 1) return sampleMult(logits, coin);
        return sampleTopp(logits, s.topp, coin, s.buf, s.keys);
    }
};

/// The first index of the largest value: the maximum in vectors, then the
/// first vector that holds it.
fn argmax(p: []const f32) u32 {
    const vecs = p.len - p.len % f32_lanes;
    var vmax: F32s = @splat(-std.math.inf(f32));
    var i: usize = 0;
    while (i < vecs) : (i += f32_lanes) vmax = maxVec(vmax, load(p, i));
    var best = maxLane(vmax);
    for (p[vecs..]) |v| best = @max(best, v);
    i = 0;
    while (i < vecs and !@reduce(.Or, load(p, i) == @as(F32s, @splat(best)))) i += f32_lanes;
    while (i < p.len and p[i] != best) i += 1;
    return if (i < p.len) @intCast(i) else 0; // all NaN
}

/// Softmax for sampling, as llama2.c's (and run.c's): the largest value,
/// e^(x - max) as glibc's expf, the sum in sum16's order (as llama2.c's -Ofast
/// builds vectorise it), then each divided by the sum. (Attention keeps
/// `softmax`: faster, and no sampling order depends on its last bits.)
fn probabilities(x: []f32) void {
    const max = largest(x);
    const H = @Vector(f64_lanes, f32);
    var i: usize = 0;
    while (i + f64_lanes <= x.len) : (i += f64_lanes)
        x[i..][0..f64_lanes].* = expLibc(f64_lanes, @as(H, x[i..][0..f64_lanes].*) - @as(H, @splat(max)));
    for (x[i..]) |*v| v.* = expLibc(1, @splat(v.* - max))[0];
    const sum = sum16(x);
    const d: F32s = @splat(sum);
    i = 0;
    while (i + f32_lanes <= x.len) : (i += f32_lanes) x[i..][0..f32_lanes].* = load(x, i) / d;
    for (x[i..]) |*v| v.* /= sum;
}

const f64_lanes = std.simd.suggestVectorLength(f64) orelse 2;

/// e^x for x <= 0 with the bits of glibc's expf (Linux's C library), so that
/// the probabilities are run.c's: in double, x·32/ln 2 = k + r with k rounded
/// to an integer by adding 1.5·2^52, and e^x = 2^(k/32) · 2^(r/32): the first
/// from a table of 2^(i/32) for i = k mod 32 with k div 32 added to its
/// exponent, the second a cubic in r. Unfused on every target, as run.c's
/// exp_sampler: glibc fuses where the CPU has FMA, which changes one float in
/// [-104, 0] (e^-63.1, about 4e-28). Below -104 the result is 0, as glibc's.
fn expLibc(comptime n: usize, x: @Vector(n, f32)) @Vector(n, f32) {
    const V = @Vector(n, f64);
    const U = @Vector(n, u64);
    const low: @Vector(n, f32) = @splat(-104.0);
    const xd: V = @floatCast(@select(f32, x < low, low, x));
    const shift: V = @splat(0x1.8p52);
    const scale: V = @splat(0x1.71547652b82fep+5); // 32 / ln 2
    var kd = scale * xd + shift;
    const ki: U = @bitCast(kd); // k in the low bits
    kd -= shift;
    const r = scale * xd - kd;
    var t: U = undefined;
    inline for (0..n) |j| t[j] = exp2_table[@intCast(ki[j] % 32)];
    const s: V = @bitCast(t +% (ki << @splat(47)));
    const z = r * @as(V, @splat(0x1.c6af84b912394p-20)) + @as(V, @splat(0x1.ebfce50fac4f3p-13));
    const y = z * (r * r) + (r * @as(V, @splat(0x1.62e42ff0c52d6p-6)) + @as(V, @splat(1.0)));
    return @floatCast(y * s);
}

/// The bits of 2^(i/32) rounded to the nearest double, less i << 47 (so that
/// adding k << 47 for k = 32q + i gives 2^(k/32)).
const exp2_table = [32]u64{
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
};

/// llama2.c's sample_mult: the first index where the running sum of p, added
/// one value at a time in index order, passes coin (the last if none does).
fn sampleMult(p: []const f32, coin: f32) u32 {
    var cdf: f32 = 0;
    for (p, 0..) |v, i| {
        cdf += v;
        if (coin < cdf) return @intCast(i);
    }
    return @intCast(p.len - 1);
}

/// How far past topp toppThreshold aims, so that the exact running sum (in
/// another order than toppThreshold's) nearly always passes topp among the
/// tokens it keeps: rounding moves such sums by far less.
const nucleus_slack: f32 = 1e-4;

/// llama2.c's sample_topp, with its result but without sorting the whole
/// vocabulary: its candidates are the tokens with p >= (1 - topp) / (n - 1),
/// ordered by probability, highest first (equal ones by index); their running
/// sum in that order ends the nucleus at the first token where it passes topp
/// (or at the last candidate), and coin times that sum picks a token by the
/// running sum again. Only the candidates at or above a threshold just below
/// the nucleus's edge are sorted: all tokens after them in that order are
/// smaller, so the walk over them is llama2.c's when their sum passes topp;
/// if rounding leaves it short, all of llama2.c's candidates are sorted.
fn sampleTopp(p: []const f32, topp: f32, coin: f32, buf: []f32, keys: []u64) u32 {
    if (p.len < 2) return 0;
    const cutoff = (1 - topp) / @as(f32, @floatFromInt(p.len - 1));
    var th = @max(toppThreshold(p, @min(topp + nucleus_slack, 1), buf), cutoff);
    while (true) : (th = cutoff) {
        const n = collectAtLeast(keys, p, th);
        const cand = sortKeys(keys[0..n], keys[p.len..][0..n]);
        var cum: f32 = 0;
        var last: ?usize = null;
        for (cand, 0..) |key, i| {
            cum += keyProb(key);
            if (cum > topp) {
                last = i;
                break;
            }
        }
        if (last == null) {
            if (th > cutoff) continue; // short of topp: sort all the candidates
            // None at all (a tiny topp over a small, flat vocabulary), where
            // llama2.c reads before its array: the most probable token.
            if (cand.len == 0) return argmax(p);
            last = cand.len - 1;
        }
        const r = coin * cum;
        var cdf: f32 = 0;
        for (cand[0..last.?]) |key| {
            cdf += keyProb(key);
            if (r < cdf) return keyIndex(key);
        }
        return keyIndex(cand[last.?]);
    }
}

/// A candidate as one integer: the bits of its (positive) probability
/// inverted, then its index, so that ascending keys order the candidates by
/// probability, highest first, and equal ones by index (a positive float's
/// bits order as its values do).
fn candidateKey(prob: f32, index: usize) u64 {
    return @as(u64, ~@as(u32, @bitCast(prob))) << 32 | index;
}

fn keyProb(key: u64) f32 {
    return @bitCast(~@as(u32, @intCast(key >> 32)));
}

fn keyIndex(key: u64) u32 {
    return @truncate(key);
}

/// Keys sorted ascending, in place or in `room` (which it returns). A few
/// hundred by comparisons; more by their probability bits alone, least
/// significant 11 first, each pass stable so that equal ones stay in index
/// order (as collectAtLeast gives them): the thousands of candidates of a flat
/// distribution took milliseconds to sort by comparisons.
fn sortKeys(keys: []u64, room: []u64) []u64 {
    if (keys.len <= 256) {
        std.sort.pdq(u64, keys, {}, std.sort.asc(u64));
        return keys;
    }
    var src = keys;
    var dst = room;
    var shift: u6 = 32;
    while (true) : (shift += 11) {
        var at: [2048]u32 = @splat(0);
        for (src) |k| at[@intCast((k >> shift) & 2047)] += 1;
        if (at[@intCast((src[0] >> shift) & 2047)] < src.len) { // else all share this digit
            var sum: u32 = 0;
            for (&at) |*a| {
                const count = a.*;
                a.* = sum;
                sum += count;
            }
            for (src) |k| {
                const d: usize = @intCast((k >> shift) & 2047);
                dst[at[d]] = k;
                at[d] += 1;
            }
            std.mem.swap([]u64, &src, &dst);
        }
        if (shift == 54) return src;
    }
}

/// The keys of the values of p that are >= th, in index order; how many.
/// Whole vectors below th are skipped at once.
fn collectAtLeast(keys: []u64, p: []const f32, th: f32) usize {
    const t: F32s = @splat(th);
    var k: usize = 0;
    var i: usize = 0;
    while (i < p.len) : (i += f32_lanes) {
        const end = @min(i + f32_lanes, p.len);
        if (end - i == f32_lanes and !@reduce(.Or, load(p, i) >= t)) continue;
        for (i..end) |j| {
            if (p[j] >= th) {
                keys[k] = candidateKey(p[j], j);
                k += 1;
            }
        }
    }
    return k;
}

/// The sum of the values of p that are >= th (or > th, if `strict`), in
/// vectors: one add chain through 32,000 floats took ~10% of a 15M int8 token.
fn massFrom(p: []const f32, th: f32, comptime strict: bool) f32 {
    const t: F32s = @splat(th);
    const zero: F32s = @splat(0);
    var acc = zero;
    var i: usize = 0;
    while (i + f32_lanes <= p.len) : (i += f32_lanes) {
        const v = load(p, i);
        acc += @select(f32, if (strict) v > t else v >= t, v, zero);
    }
    var sum = @reduce(.Add, acc);
    for (p[i..]) |v| sum += if (if (strict) v > th else v >= th) v else 0;
    return sum;
}

/// The smallest and the largest value, in vectors (compare and select, as maxVec).
fn minMax(p: []const f32) [2]f32 {
    var lo: F32s = @splat(p[0]);
    var hi = lo;
    var i: usize = 0;
    while (i + f32_lanes <= p.len) : (i += f32_lanes) {
        const v = load(p, i);
        lo = @select(f32, v < lo, v, lo);
        hi = maxVec(hi, v);
    }
    var min = -maxLane(-lo);
    var max = maxLane(hi);
    for (p[i..]) |v| {
        min = @min(min, v);
        max = @max(max, v);
    }
    return .{ min, max };
}

/// Keep the values of src that are > pivot (high) or <= pivot (!high) in
/// dst, in order; dst may alias src (each store lands at or before the values
/// just loaded). Returns how many. On AVX2, eight at a time, as run.c: the
/// scalar loop was most of top-p's time.
fn compact(dst: []f32, src: []const f32, pivot: f32, high: bool) usize {
    var k: usize = 0;
    var i: usize = 0;
    if (compact_avx2) {
        const pv: F32x8 = @splat(pivot);
        while (i + 8 <= src.len) : (i += 8) {
            const v: F32x8 = src[i..][0..8].*;
            const above: u8 = @bitCast(v > pv);
            const m = if (high) above else ~above;
            dst[k..][0..8].* = @"llvm.x86.avx2.permps"(v, keep_lanes[m]);
            k += @popCount(m);
        }
    }
    for (src[i..]) |v| {
        dst[k] = v;
        if ((v > pivot) == high) k += 1;
    }
    return k;
}

const compact_avx2 = builtin.cpu.arch == .x86_64 and std.Target.x86.featureSetHas(builtin.cpu.features, .avx2);
/// AVX2's vpermps: lane i of the result is a[idx[i]].
extern fn @"llvm.x86.avx2.permps"(a: F32x8, idx: I32x8) F32x8;

/// keep_lanes[m]: the lanes whose bits are set in m, in order, as the vpermps
/// indices that pack them to the front (for compact).
const keep_lanes: [256]I32x8 = blk: {
    @setEvalBranchQuota(4000);
    var table: [256]I32x8 = @splat(@splat(0));
    for (0..256) |m| {
        var k = 0;
        for (0..8) |lane| {
            if (m >> lane & 1 == 1) {
                table[m][k] = lane;
                k += 1;
            }
        }
    }
    break :blk table;
};

/// Top-p without sorting the vocabulary: the threshold th such that the
/// tokens with p >= th are the smallest set with mass >= topp. Each round
/// splits the candidates at a pivot (alternately their mean, and the midpoint
/// of their float bit patterns, which bounds the rounds at ~32) and keeps the
/// side holding the boundary; the last few are sorted.
fn toppThreshold(p: []const f32, topp: f32, buf: []f32) f32 {
    var src = p;
    var need = topp;
    var mass: f32 = 1;
    var lo: f32 = 0;
    var hi: f32 = 1;
    var round: usize = 0;
    while (true) : (round += 1) {
        if (src.len <= 32) {
            var v: [32]f32 = undefined;
            const few = v[0..src.len];
            @memcpy(few, src);
            std.sort.insertion(f32, few, {}, std.sort.desc(f32));
            for (few) |x| {
                need -= x;
                if (need <= 0) return x;
            }
            return if (few.len > 0) few[few.len - 1] else 0;
        }
        if (round > 0) { // exact bounds of the current candidates
            lo, hi = minMax(src);
            if (lo >= hi) return lo; // all equal: keep them all
        }
        var pivot = mass / @as(f32, @floatFromInt(src.len));
        if (round & 1 == 1 or !(pivot >= lo and pivot < hi)) {
            const a: u64 = @as(u32, @bitCast(lo));
            const b: u64 = @as(u32, @bitCast(hi));
            pivot = @bitCast(@as(u32, @intCast((a + b) / 2)));
        }
        const above = massFrom(src, pivot, true);
        const n = if (above >= need) blk: { // the boundary is above the pivot
            mass = above;
            break :blk compact(buf, src, pivot, true);
        } else blk: { // everything above is in; look below
            need -= above;
            mass -= above;
            break :blk compact(buf, src, pivot, false);
        };
        src = buf[0..n];
        if (round > 64) return src[0]; // cannot happen; a bound, not a path
    }
}

// ------------------------------------------------------------------ generation

/// llama2.c's loop as an iterator: feed the prompt, then sample; at most
/// `steps` forward passes (not counting `shift`'s), and (when asked) stop when
/// the model says BOS. Steps past seq_len need `keep` > 0 and a `window` of
/// seq_len ids (see `shift`); keep 0 is llama2.c's limit, steps <= seq_len.
pub const Generator = struct {
    t: *Transformer,
    sampler: *Sampler,
    prompt: []const u32,
    steps: usize,
    stop_at_bos: bool = true,
    pos: usize = 0, // forward passes done
    token: u32,
    done: bool = false,
    keep: usize = 0,
    window: []u32 = &.{}, // with keep > 0: the ids at positions 0..at-1
    at: usize = 0, // the next position in the KV cache

    pub fn init(t: *Transformer, sampler: *Sampler, prompt: []const u32, steps: usize, diag: *Diagnostic) Error!Generator {
        if (prompt.len == 0) return diag.fail(error.BadInput, "generate: the prompt needs at least one token (BOS)", .{});
        return .{ .t = t, .sampler = sampler, .prompt = prompt, .steps = steps, .token = prompt[0] };
    }

    /// The next token of the sequence after the first prompt token, or null at the end.
    pub fn next(g: *Generator, diag: *Diagnostic) Error!?u32 {
        if (g.done or g.pos >= g.steps) return null;
        if (g.keep > 0 and g.at == g.t.config.seq_len) try g.shift(diag);
        const logits = try g.t.forward(g.token, g.at, diag);
        if (g.keep > 0) g.window[g.at] = g.token;
        g.at += 1;
        const token = if (g.pos + 1 < g.prompt.len) g.prompt[g.pos + 1] else try g.sampler.sample(logits, diag);
        g.pos += 1;
        if (token == bos and g.pos >= g.prompt.len and g.stop_at_bos) {
            g.done = true;
            return null;
        }
        g.token = token;
        return token;
    }

    /// The context shift, when all seq_len positions hold the window's ids:
    /// keep the first `keep`, drop the older half of the rest (rounded up, so
    /// at least one goes), and run the ids after the kept ones again at their
    /// new positions (the kept ones' keys and values stay: they see only each
    /// other). Running them again gives the bits of a fresh run over the
    /// shortened context, which moving the cached keys to new angles would not.
    fn shift(g: *Generator, diag: *Diagnostic) Error!void {
        const S = g.t.config.seq_len;
        const drop = (S - g.keep + 1) / 2;
        std.mem.copyForwards(u32, g.window[g.keep .. S - drop], g.window[g.keep + drop .. S]);
        for (g.keep..S - drop) |p| _ = try g.t.forward(g.window[p], p, diag);
        g.at = S - drop;
    }
};

// ------------------------------------------------------------------ settings

/// The sampler's settings and their rules, for the command line and the page
/// alike (run.c has the same): numbers are decimal text, judged on the bits of
/// the f32 they round to. The temperature is 0 (greedy) or a normal number
/// that keeps logits / temperature in range; top-p is 0 or 1 (off), or a
/// fraction not too small to mean anything.
pub const temperature_rule = "temperature must be 0 (greedy) or between 1e-6 and 1e6";
pub const topp_rule = "top-p must be 0 or 1 (off), or between 1e-6 and 1";

fn bitsOf(f: f32) u32 {
    return @bitCast(f);
}

/// (a positive f32's bits order as its values do; NaN and infinities lie past 1e6's)
pub fn temperatureOk(t: f32) bool {
    const u = bitsOf(t);
    return u << 1 == 0 or (u >= bitsOf(1e-6) and u <= bitsOf(1e6));
}

pub fn toppOk(p: f32) bool {
    const u = bitsOf(p);
    return u << 1 == 0 or (u >= bitsOf(1e-6) and u <= bitsOf(1.0));
}

fn isDigit(c: u8) bool {
    return c >= '0' and c <= '9';
}

/// Decimal text, [+-]digits[.digits][(e|E)[+-]digits] with a digit before the
/// exponent (no hex, inf, nan, spaces or digit separators: text every build
/// reads alike), as the f32 it rounds to; null if it is not that. Past f32's
/// range it is an infinity; a number that is not 0 but rounds to 0 is the
/// smallest subnormal, so that the rules refuse it as too small.
pub fn parseDecimal(text: []const u8) ?f32 {
    var i: usize = 0;
    var digits: usize = 0;
    var nonzero = false;
    if (i < text.len and (text[i] == '+' or text[i] == '-')) i += 1;
    while (i < text.len and isDigit(text[i])) : (i += 1) {
        digits += 1;
        nonzero = nonzero or text[i] != '0';
    }
    if (i < text.len and text[i] == '.') {
        i += 1;
        while (i < text.len and isDigit(text[i])) : (i += 1) {
            digits += 1;
            nonzero = nonzero or text[i] != '0';
        }
    }
    if (digits > 0 and i < text.len and (text[i] == 'e' or text[i] == 'E')) {
        i += 1;
        if (i < text.len and (text[i] == '+' or text[i] == '-')) i += 1;
        if (i == text.len or !isDigit(text[i])) return null;
        while (i < text.len and isDigit(text[i])) i += 1;
    }
    if (digits == 0 or i != text.len) return null;
    const d = std.fmt.parseFloat(f64, text) catch return null; // correctly rounded, as strtod
    const u: u64 = @bitCast(d);
    const sign: u32 = @as(u32, @intCast(u >> 63)) << 31;
    if (u << 1 >> 1 > @as(u64, @bitCast(@as(f64, std.math.floatMax(f32))))) return @bitCast(sign | 0x7f800000);
    const f: f32 = @floatCast(d);
    return if (nonzero and bitsOf(f) << 1 == 0) @bitCast(sign | 1) else f;
}

/// Integer text, [+-]digits, as its sign and magnitude (2^64 - 1 when it is
/// more: `saturated`); null if it is not that.
pub const Integer = struct { negative: bool, magnitude: u64, saturated: bool = false };

pub fn parseInteger(text: []const u8) ?Integer {
    var r: Integer = .{ .negative = text.len > 0 and text[0] == '-', .magnitude = 0 };
    const digits = if (text.len > 0 and (text[0] == '+' or text[0] == '-')) text[1..] else text;
    if (digits.len == 0) return null;
    for (digits) |c| {
        if (!isDigit(c)) return null;
        const m = std.math.mul(u64, r.magnitude, 10) catch null;
        const sum = if (m) |x| std.math.add(u64, x, c - '0') catch null else null;
        if (sum == null) r.saturated = true;
        r.magnitude = if (r.saturated) std.math.maxInt(u64) else sum.?;
    }
    return r;
}

/// How messages name a setting: by its flag on the command line, by its name on the page.
pub const Naming = enum { flag, setting };

fn label(naming: Naming, flag: []const u8, setting: []const u8) []const u8 {
    return if (naming == .flag) flag else setting;
}

pub fn parseTemperature(text: []const u8, naming: Naming, diag: *Diagnostic) Error!f32 {
    const t = parseDecimal(text) orelse
        return diag.fail(error.BadInput, "{s}: expected a number, got '{s}'", .{ label(naming, "-t", "temperature"), text });
    if (!temperatureOk(t)) return diag.fail(error.BadInput, "{s}" ++ temperature_rule ++ ", got '{s}'", .{ label(naming, "-t: ", ""), text });
    return t;
}

pub fn parseTopp(text: []const u8, naming: Naming, diag: *Diagnostic) Error!f32 {
    const p = parseDecimal(text) orelse
        return diag.fail(error.BadInput, "{s}: expected a number, got '{s}'", .{ label(naming, "-p", "top-p"), text });
    if (!toppOk(p)) return diag.fail(error.BadInput, "{s}" ++ topp_rule ++ ", got '{s}'", .{ label(naming, "-p: ", ""), text });
    return p;
}

pub fn parseSeed(text: []const u8, naming: Naming, diag: *Diagnostic) Error!u64 {
    const x = parseInteger(text);
    if (x == null or x.?.saturated or (x.?.negative and x.?.magnitude != 0))
        return diag.fail(error.BadInput, "{s}seed must be an integer in 0..{d}, got '{s}'", .{ label(naming, "-s: ", ""), std.math.maxInt(u64), text });
    return x.?.magnitude;
}

/// Steps: any integer; outside 0..seq_len means seq_len (see `stepsFor`).
pub fn parseSteps(text: []const u8, naming: Naming, diag: *Diagnostic) Error!Integer {
    return parseInteger(text) orelse
        diag.fail(error.BadInput, "{s}: expected an integer, got '{s}'", .{ label(naming, "-n", "steps"), text });
}

/// The steps to run for a steps setting: 0 (or none) means seq_len, and so
/// does a number outside 0..most (`outside` says so). most is seq_len, or
/// `most_shifted` with the context shift (-k).
pub fn stepsFor(n: ?Integer, seq_len: usize, most: usize) struct { steps: usize, outside: bool } {
    const x = n orelse return .{ .steps = seq_len, .outside = false };
    if ((x.negative and x.magnitude != 0) or x.magnitude > most) return .{ .steps = seq_len, .outside = true };
    return .{ .steps = if (x.magnitude == 0) seq_len else @intCast(x.magnitude), .outside = false };
}

/// The most steps with the context shift (run.c's: its counts are C ints).
pub const most_shifted: usize = std.math.maxInt(i32) - 1;

/// The context shift's keep (-k): an integer in 0..seq_len - 1; 0 is off.
pub fn parseKeep(text: []const u8, seq_len: usize, diag: *Diagnostic) Error!usize {
    const x = parseInteger(text);
    if (x == null or x.?.saturated or (x.?.negative and x.?.magnitude != 0) or x.?.magnitude >= seq_len)
        return diag.fail(error.BadInput, "-k: expected an integer in 0..{d} (seq_len - 1), got '{s}'", .{ seq_len - 1, text });
    return @intCast(x.?.magnitude);
}

// ------------------------------------------------------------------ CLI

const usage_text =
    \\Usage:   runzig <checkpoint> [options]
    \\Example: runzig model.bin -n 256 -i "Once upon a time"
    \\Options:
    \\  -t <float>  temperature, 0 (greedy) or 1e-6..1e6, default 1.0
    \\  -p <float>  top-p (nucleus), 0 or 1 (off) or 1e-6..1, default 0.9
    \\  -s <int>    random seed, default time(NULL), 0 = time(NULL)
    \\  -n <int>    number of steps to run, default 256, 0 = seq_len
    \\  -k <int>    past seq_len: keep the first k tokens, drop the older half of
    \\              the rest and go on (1..seq_len-1; -n may then pass seq_len),
    \\              default 0 = stop at seq_len
    \\  -i <string> input prompt
    \\  -z <string> tokenizer path, default tokenizer.bin
    \\  -m <string> mode: generate|chat, default generate
    \\  -y <string> (optional) system prompt in chat mode
    \\
;

const Options = struct {
    model_path: []const u8,
    tokenizer_path: []const u8 = "tokenizer.bin",
    prompt: ?[]const u8 = null,
    system: ?[]const u8 = null,
    chat: bool = false,
    temperature: f32 = 1.0,
    topp: f32 = 0.9,
    seed: ?u64 = null,
    steps: ?Integer = null, // as given; 256 when not
    steps_text: []const u8 = "256",
    keep_text: ?[]const u8 = null, // checked against seq_len once the model is read
};

const CliError = Error || error{ Help, Usage };

fn parseOptions(args: []const [:0]const u8, diag: *Diagnostic) CliError!Options {
    if (args.len < 2) return error.Usage;
    const first = args[1];
    if (std.mem.eql(u8, first, "-h") or std.mem.eql(u8, first, "--help")) return error.Help;
    if (first.len > 0 and first[0] == '-') return diag.fail(error.BadInput, "expected the model path first, got flag '{s}' (see runzig -h)", .{first});
    var o: Options = .{ .model_path = first };
    var i: usize = 2;
    while (i < args.len) : (i += 2) {
        const flag = args[i];
        if (std.mem.eql(u8, flag, "-h")) return error.Help;
        if (flag.len != 2 or flag[0] != '-' or std.mem.indexOfScalar(u8, "tpsnkizmy", flag[1]) == null)
            return diag.fail(error.BadInput, "unknown flag '{s}' (see runzig -h)", .{flag});
        if (i + 1 >= args.len) return diag.fail(error.BadInput, "flag {s} needs a value (see runzig -h)", .{flag});
        const v = args[i + 1];
        switch (flag[1]) {
            't' => o.temperature = try parseTemperature(v, .flag, diag),
            'p' => o.topp = try parseTopp(v, .flag, diag),
            's' => o.seed = try parseSeed(v, .flag, diag),
            'n' => {
                o.steps = try parseSteps(v, .flag, diag);
                o.steps_text = v;
            },
            'k' => o.keep_text = v,
            'i' => o.prompt = v,
            'z' => o.tokenizer_path = v,
            'm' => {
                if (std.mem.eql(u8, v, "chat")) o.chat = true else if (!std.mem.eql(u8, v, "generate"))
                    return diag.fail(error.BadInput, "-m: unknown mode '{s}' (generate or chat)", .{v});
            },
            'y' => o.system = v,
            else => unreachable,
        }
    }
    return o;
}

/// A file that is to be read whole, opened: only a regular file that is not
/// empty. Its kind is looked up before it is opened, so that a FIFO (which
/// open would wait on for a writer), a directory or a device is refused before
/// anything is read or sized from it. `err` is the error to report with.
fn openRegular(io: Io, path: []const u8, err: Error, diag: *Diagnostic) Error!struct { file: Io.File, size: u64 } {
    const cwd = Io.Dir.cwd();
    const kind = cwd.statFile(io, path, .{}) catch |e|
        return diag.fail(err, "{s}: cannot open: {s}", .{ path, @errorName(e) });
    if (kind.kind != .file) return diag.fail(err, "{s}: not a regular file ({s})", .{ path, kindName(kind.kind) });
    const file = cwd.openFile(io, path, .{}) catch |e| return diag.fail(err, "{s}: cannot open: {s}", .{ path, @errorName(e) });
    errdefer file.close(io);
    const stat = file.stat(io) catch |e| return diag.fail(err, "{s}: cannot stat: {s}", .{ path, @errorName(e) });
    if (stat.kind != .file) return diag.fail(err, "{s}: not a regular file ({s})", .{ path, kindName(stat.kind) });
    if (stat.size == 0) return diag.fail(err, "{s}: file is empty", .{path});
    return .{ .file = file, .size = stat.size };
}

fn kindName(kind: Io.File.Kind) []const u8 {
    return switch (kind) {
        .directory => "a directory",
        .named_pipe => "a named pipe",
        .character_device => "a character device",
        .block_device => "a block device",
        .unix_domain_socket => "a socket",
        else => "an unknown kind",
    };
}

/// len bytes of a file from offset `off` into buf, in pieces (wasmtime's WASI
/// refuses one read of a few hundred MB).
fn readAt(io: Io, file: Io.File, buf: []u8, off: u64, path: []const u8, err: Error, diag: *Diagnostic) Error!void {
    var done: usize = 0;
    while (done < buf.len) {
        const piece = buf[done..@min(buf.len, done + (16 << 20))];
        const got = file.readPositionalAll(io, piece, off + done) catch |e|
            return diag.fail(err, "{s}: read failed: {s}", .{ path, @errorName(e) });
        if (got != piece.len) return diag.fail(err, "{s}: read failed: the file shrank while being read", .{path});
        done += got;
    }
}

/// A whole file into buf (page-aligned), saying whether any 4-byte word could
/// be a NaN or infinity: natively the file is mapped and copied by
/// copyChecking; WASI cannot map files, so it reads them in pieces, each
/// checked after it is read (while in cache).
fn readChecking(io: Io, file: Io.File, buf: []align(std.heap.page_size_min) u8, path: []const u8, diag: *Diagnostic) Error!bool {
    if (builtin.os.tag != .wasi) {
        if (std.posix.mmap(null, buf.len, .{ .READ = true }, .{ .TYPE = .PRIVATE }, file.handle, 0)) |map| {
            defer std.posix.munmap(map);
            return copyChecking(buf, map);
        } else |_| {} // (read it then)
    }
    var any = false;
    var done: usize = 0;
    while (done < buf.len) : (done += 256 << 10) {
        const piece: []align(4) u8 = @alignCast(buf[done..@min(buf.len, done + (256 << 10))]);
        try readAt(io, file, piece, done, path, error.BadModel, diag);
        any = any or anyNonFinite(@ptrCast(piece[0 .. piece.len / 4 * 4]));
    }
    return any;
}

/// The model file read into anonymous memory, on huge pages where Linux gives
/// them: the matmuls stream that ~20% faster than a mapping of the page
/// cache's scattered 4 KiB pages (as run.c measured), and WASI cannot map big
/// files. Its header is read and checked against its size first, before the
/// memory for the rest is allocated. An fp32 file is checked for NaN and
/// infinity as it is read (`check_finite`: one may be there, look tensor by
/// tensor); an int8 file's bytes often look like one, so its scales and norms
/// (a small part of it) are always checked.
fn readModel(io: Io, path: []const u8, diag: *Diagnostic) Error!struct { bytes: []align(std.heap.page_size_min) u8, check_finite: bool } {
    const opened = try openRegular(io, path, error.BadModel, diag);
    const file = opened.file;
    defer file.close(io);
    var head: [256]u8 = undefined;
    const head_len: usize = @intCast(@min(opened.size, head.len));
    try readAt(io, file, head[0..head_len], 0, path, error.BadModel, diag);
    const header = try readHeaderOf(head[0..head_len], opened.size, path, diag);
    const len = std.math.cast(usize, opened.size) orelse
        return diag.fail(error.OutOfMemory, "{s}: file is {d} bytes, too big to load here", .{ path, opened.size });
    const buf = std.heap.page_allocator.alignedAlloc(u8, .fromByteUnits(std.heap.page_size_min), len) catch
        return diag.fail(error.OutOfMemory, "{s}: out of memory for its {d} bytes", .{ path, len });
    errdefer std.heap.page_allocator.free(buf);
    if (builtin.os.tag == .linux) _ = std.os.linux.madvise(buf.ptr, buf.len, std.os.linux.MADV.HUGEPAGE);
    if (header.version == 2) {
        try readAt(io, file, buf, 0, path, error.BadModel, diag);
        return .{ .bytes = buf, .check_finite = true };
    }
    return .{ .bytes = buf, .check_finite = try readChecking(io, file, buf, path, diag) };
}

/// tokenizer.bin: its header and size are checked before it is read whole.
fn readTokenizer(gpa: Allocator, io: Io, path: []const u8, vocab_size: usize, diag: *Diagnostic) Error!Tokenizer {
    const opened = try openRegular(io, path, error.BadTokenizer, diag);
    defer opened.file.close(io);
    var head: [4]u8 = @splat(0);
    const head_len: usize = @intCast(@min(opened.size, head.len));
    try readAt(io, opened.file, head[0..head_len], 0, path, error.BadTokenizer, diag);
    _ = try Tokenizer.checkSize(&head, opened.size, vocab_size, path, diag);
    const data = try gpa.alloc(u8, std.math.cast(usize, opened.size) orelse return error.OutOfMemory);
    defer gpa.free(data);
    try readAt(io, opened.file, data, 0, path, error.BadTokenizer, diag);
    return Tokenizer.init(gpa, data, vocab_size, path, diag);
}

/// stdout, written piece by piece and flushed after each, as the story streams.
const Output = struct {
    writer: Io.File.Writer,

    fn piece(o: *Output, p: []const u8) Io.Writer.Error!void {
        if (!printable(p)) return;
        try o.writer.interface.writeAll(p);
        try o.writer.interface.flush();
    }
    fn text(o: *Output, s: []const u8) Io.Writer.Error!void {
        try o.writer.interface.writeAll(s);
        try o.writer.interface.flush();
    }
};

fn seconds(io: Io) f64 {
    const ns = Io.Timestamp.now(io, .awake).nanoseconds;
    return @as(f64, @floatFromInt(ns)) * 1e-9;
}

fn threadCount(init: std.process.Init) usize {
    if (builtin.single_threaded) return 1;
    if (init.environ_map.get("OMP_NUM_THREADS")) |v| {
        if (std.fmt.parseInt(usize, v, 10)) |n| return @max(1, @min(n, 256)) else |_| {}
    }
    return std.Thread.getCpuCount() catch 1;
}

pub fn main(init: std.process.Init) u8 {
    var diag: Diagnostic = .{};
    cli(init, &diag) catch |err| {
        var buf: [1024]u8 = undefined;
        var stderr = Io.File.stderr().writer(init.io, &buf);
        const w = &stderr.interface;
        switch (err) {
            error.Help => {
                var obuf: [1024]u8 = undefined;
                var stdout = Io.File.stdout().writer(init.io, &obuf);
                stdout.interface.writeAll(usage_text) catch {};
                stdout.interface.flush() catch {};
                return 0;
            },
            error.Usage => w.writeAll(usage_text) catch {},
            else => {
                const msg = if (diag.msg.len > 0) diag.msg else @errorName(err);
                w.print("runzig: {s}\n", .{msg}) catch {};
            },
        }
        w.flush() catch {};
        return 1;
    };
    return 0;
}

fn cli(init: std.process.Init, diag: *Diagnostic) !void {
    const io = init.io;
    const gpa = init.gpa;
    const args = try init.minimal.args.toSlice(init.arena.allocator());
    const o = try parseOptions(args, diag);
    // no seed or 0: the clock's seconds, as llama2.c
    const clock: u64 = @intCast(@max(1, @divFloor(Io.Timestamp.now(io, .real).nanoseconds, std.time.ns_per_s)));
    const seed = if (o.seed) |s| (if (s != 0) s else clock) else clock;

    const model = try readModel(io, o.model_path, diag);
    defer std.heap.page_allocator.free(model.bytes);
    var t = try Transformer.init(gpa, model.bytes, o.model_path, model.check_finite, diag);
    defer t.deinit();
    const seq_len = t.config.seq_len;
    const keep = if (o.keep_text) |text| try parseKeep(text, seq_len, diag) else 0;
    if (keep > 0 and o.chat) return diag.fail(error.BadInput, "-k: the context shift is for -m generate only", .{});
    const most = if (keep > 0) most_shifted else seq_len; // with -k, -n may pass seq_len
    const n = stepsFor(o.steps orelse .{ .negative = false, .magnitude = 256 }, seq_len, most);
    const steps = n.steps;
    var ebuf: [256]u8 = undefined;
    var stderr = Io.File.stderr().writer(io, &ebuf);
    if (n.outside and o.steps != null) {
        try stderr.interface.print("runzig: note: -n {s} is outside 0..{d}, using seq_len {d}\n", .{ o.steps_text, most, seq_len });
        try stderr.interface.flush();
    }
    var tokenizer = try readTokenizer(gpa, io, o.tokenizer_path, t.config.vocab_size, diag);
    defer tokenizer.deinit();
    var sampler = try Sampler.init(gpa, t.config.vocab_size, o.temperature, o.topp, seed);
    defer sampler.deinit(gpa);
    try t.useThreads(io, threadCount(init));

    var obuf: [4096]u8 = undefined;
    var out: Output = .{ .writer = Io.File.stdout().writer(io, &obuf) };
    if (o.chat) return chat(gpa, io, &t, &tokenizer, &sampler, &out, o, steps, diag);

    const prompt = try tokenizer.encode(gpa, o.prompt orelse "", true, false, diag);
    defer gpa.free(prompt);
    if (prompt.len > seq_len) return diag.fail(error.BadInput, "-i: prompt encodes to {d} tokens, more than seq_len {d}", .{ prompt.len, seq_len });
    var gen = try Generator.init(&t, &sampler, prompt, steps, diag);
    const window = try gpa.alloc(u32, if (keep > 0) seq_len else 0);
    defer gpa.free(window);
    gen.keep = keep;
    gen.window = window;
    var start: f64 = 0;
    var prev = gen.token;
    while (try gen.next(diag)) |token| {
        try out.piece(tokenizer.decode(prev, token));
        prev = token;
        if (gen.pos == 1) start = seconds(io); // time from the second token, as llama2.c
    }
    try out.text("\n");
    if (gen.pos > 1) { // as llama2.c: only when a token after the first was timed
        const tps = @as(f64, @floatFromInt(gen.pos - 1)) / (seconds(io) - start);
        try stderr.interface.print("achieved tok/s: {d:.6}\n", .{tps});
        try stderr.interface.flush();
    }
}

/// Chat: Llama 2's [INST] template; user turns from -i, then stdin.
fn chat(gpa: Allocator, io: Io, t: *Transformer, tok: *Tokenizer, sampler: *Sampler, out: *Output, o: Options, steps: usize, diag: *Diagnostic) (Error || Io.Writer.Error || error{ReadFailed})!void {
    var ibuf: [8192]u8 = undefined;
    var stdin = Io.File.stdin().reader(io, &ibuf);
    var rendered: std.ArrayList(u8) = .empty;
    defer rendered.deinit(gpa);
    var ids: []u32 = &.{};
    defer gpa.free(ids);
    var pos: usize = 0;
    var user_turn = true;
    var first = true;
    var next: u32 = 0;
    var idx: usize = 0;
    while (pos < steps) {
        if (user_turn) {
            const user: []const u8 = if (first and o.prompt != null) o.prompt.? else blk: {
                try out.text("User: ");
                const line = stdin.interface.takeDelimiter('\n') catch |err| switch (err) {
                    error.StreamTooLong => stdin.interface.buffered(),
                    error.ReadFailed => return error.ReadFailed,
                } orelse break;
                break :blk line;
            };
            rendered.clearRetainingCapacity();
            if (first and o.system != null and o.system.?.len > 0)
                try rendered.print(gpa, "[INST] <<SYS>>\n{s}\n<</SYS>>\n\n{s} [/INST]", .{ o.system.?, user })
            else
                try rendered.print(gpa, "[INST] {s} [/INST]", .{user});
            first = false;
            gpa.free(ids);
            ids = &.{};
            ids = try tok.encode(gpa, rendered.items, true, false, diag);
            if (pos + ids.len > t.config.seq_len)
                return diag.fail(error.BadInput, "chat: prompt of {d} tokens does not fit in the {d} positions left of seq_len {d}", .{ ids.len, t.config.seq_len - pos, t.config.seq_len });
            idx = 0;
            user_turn = false;
            try out.text("Assistant: ");
        }
        var token: u32 = undefined;
        if (idx < ids.len) {
            token = ids[idx];
            idx += 1;
        } else token = next;
        if (idx >= ids.len and token == eos) {
            user_turn = true;
            try out.text("\n");
        }
        const logits = try t.forward(token, pos, diag);
        next = try sampler.sample(logits, diag);
        pos += 1;
        if (idx >= ids.len and next != eos) try out.piece(tok.decode(token, next));
        if (next == eos) {
            user_turn = true;
            try out.text("\n");
        }
    }
    try out.text("\n");
}

// ------------------------------------------------------------------ tests (`zig test run.zig`)

test "expVec is within 2e-7 relative of std.math.exp on [-87, 88]" {
    var worst: f64 = 0;
    var x: f32 = -87.0;
    while (x <= 88.0) : (x += 0.0137) {
        const want = @exp(@as(f64, x));
        const got: f64 = expScalar(x);
        worst = @max(worst, @abs(got - want) / want);
    }
    try std.testing.expect(worst < 2e-7);
    try std.testing.expectEqual(@as(f32, 1.0), expScalar(0));
}

test "softmax sums to one and keeps the order, on lengths that end in a partial vector" {
    var buf: [37]f32 = undefined;
    for (&buf, 0..) |*v, i| v.* = @as(f32, @floatFromInt(i % 11)) * 0.7 - 3.0;
    softmax(&buf);
    var sum: f32 = 0;
    for (buf) |v| sum += v;
    try std.testing.expectApproxEqAbs(@as(f32, 1.0), sum, 1e-6);
    try std.testing.expect(buf[10] > buf[9] and buf[11] < buf[10]);
    try std.testing.expectApproxEqRel(@exp(@as(f32, 0.7)), buf[10] / buf[9], 1e-6);
}

test "quantize rounds halves to even, as C's lrintf, in the vector body and the scalar tail" {
    // a group of 9 (two vectors of 4 and a tail on SIMD128; scale = 127 / 127 = 1)
    const x = [_]f32{ 127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 2.5 };
    var q: [9]i8 = undefined;
    var s: [1]f32 = undefined;
    quantize(&q, &s, &x, 9);
    try std.testing.expectEqual(@as(f32, 1), s[0]);
    try std.testing.expectEqualSlices(i8, &.{ 127, 0, 2, 2, 0, -2, -2, 3, 2 }, &q);
}

test "argmax: the first of equal maxima, a maximum in the tail, and 0 when all are NaN" {
    var p = [_]f32{ 1, 5, 2, 5, 0, 0, 0, 0, 0, 0 };
    try std.testing.expectEqual(@as(u32, 1), argmax(&p));
    p[9] = 6;
    try std.testing.expectEqual(@as(u32, 9), argmax(&p));
    const nan: [6]f32 = @splat(std.math.nan(f32));
    try std.testing.expectEqual(@as(u32, 0), argmax(&nan));
}

test "expLibc: glibc's expf bits, unfused" {
    // expf's results printed by glibc 2.36 on x86-64, with and without its FMA variant
    const cases = [_][3]u32{
        .{ 0x00000000, 0x3f800000, 0x3f800000 }, // 0
        .{ 0xb0800000, 0x3f800000, 0x3f800000 }, // -2^-30
        .{ 0xbf000000, 0x3f1b4598, 0x3f1b4598 }, // -0.5
        .{ 0xbf800000, 0x3ebc5ab2, 0x3ebc5ab2 }, // -1
        .{ 0xc0135d8d, 0x3dccccd0, 0x3dccccd0 }, // -2.302585
        .{ 0xc1200000, 0x383e6bce, 0x383e6bce }, // -10
        .{ 0xc27c65d9, 0x11fa2993, 0x11fa2992 }, // -63.099464: the one where they differ
        .{ 0xc2ae999a, 0x0084c38b, 0x0084c38b }, // -87.3: subnormal from here on
        .{ 0xc2c80000, 0x0000001b, 0x0000001b }, // -100
        .{ 0xc2cfcccd, 0x00000001, 0x00000001 }, // -103.9
        .{ 0xc2d00000, 0x00000000, 0x00000000 }, // -104
        .{ 0xc3480000, 0x00000000, 0x00000000 }, // -200
        .{ 0xff800000, 0x00000000, 0x00000000 }, // -inf
    };
    var xs: [cases.len]f32 = undefined;
    for (&xs, cases) |*x, c| x.* = @bitCast(c[0]);
    const ys: [cases.len]f32 = expLibc(cases.len, xs);
    for (cases, 0..) |c, i| {
        const want = c[2];
        try std.testing.expectEqual(want, @as(u32, @bitCast(ys[i])));
        try std.testing.expectEqual(want, @as(u32, @bitCast(expLibc(1, .{xs[i]})[0])));
    }
}

test "probabilities: e^(x - max) summed (under 16: in index order), then divided by the sum" {
    // e^0, e^-1, e^-0.5 as glibc's expf has them (the test above), then f32 sums in order
    const e0: f32 = 1;
    const e1: f32 = @bitCast(@as(u32, 0x3ebc5ab2));
    const e2: f32 = @bitCast(@as(u32, 0x3f1b4598));
    var x = [_]f32{ 2, 1, 1.5, 1, 2, 1.5, 2, 1, 1, 1.5, 2 }; // 11: vectors and a tail
    const es = [_]f32{ e0, e1, e2, e1, e0, e2, e0, e1, e1, e2, e0 };
    var sum: f32 = 0;
    for (es) |e| sum += e;
    probabilities(&x);
    for (x, es) |p, e| try std.testing.expectEqual(e / sum, p);
}

test "Sampler: the seed is xorshift64*'s first state, as llama2.c's -s" {
    var s = try Sampler.init(std.testing.allocator, 4, 1, 0.9, 42);
    defer s.deinit(std.testing.allocator);
    // from s ^= s >> 12; s ^= s << 25; s ^= s >> 27; (s * 0x2545F4914F6CDD1D) >> 32, by hand
    try std.testing.expectEqual(@as(u32, 0x56ce4ab7), s.nextU32());
    try std.testing.expectEqual(@as(u32, 0xc841eb53), s.nextU32());
    try std.testing.expectEqual(@as(f32, @as(f32, 0xca466b) / 16777216.0), s.nextF32());
}

/// llama2.c's sample_topp as it reads: the candidates, a stable sort by
/// probability (so equal ones stay in index order), the sums, the walk.
fn referenceTopp(gpa: Allocator, p: []const f32, topp: f32, coin: f32) !u32 {
    const Cand = struct { prob: f32, index: u32 };
    var cand: std.ArrayList(Cand) = .empty;
    defer cand.deinit(gpa);
    const cutoff = (1 - topp) / @as(f32, @floatFromInt(p.len - 1));
    for (p, 0..) |v, i| if (v >= cutoff) try cand.append(gpa, .{ .prob = v, .index = @intCast(i) });
    std.sort.block(Cand, cand.items, {}, struct {
        fn higher(_: void, a: Cand, b: Cand) bool {
            return a.prob > b.prob;
        }
    }.higher);
    var cum: f32 = 0;
    var last = cand.items.len - 1;
    for (cand.items, 0..) |c, i| {
        cum += c.prob;
        if (cum > topp) {
            last = i;
            break;
        }
    }
    const r = coin * cum;
    var cdf: f32 = 0;
    for (cand.items[0 .. last + 1]) |c| {
        cdf += c.prob;
        if (r < cdf) return c.index;
    }
    return cand.items[last].index;
}

test "sampleMult and sampleTopp pick llama2.c's tokens, equal probabilities included" {
    const gpa = std.testing.allocator;
    var prng = std.Random.DefaultPrng.init(7);
    const rnd = prng.random();
    for ([_]usize{ 3, 37, 512, 4093 }) |n| {
        const p = try gpa.alloc(f32, n);
        defer gpa.free(p);
        const buf = try gpa.alloc(f32, n);
        defer gpa.free(buf);
        const keys = try gpa.alloc(u64, 2 * n);
        defer gpa.free(keys);
        for ([_]f64{ 0.3, 2, 6 }) |spread| {
            // logits rounded to steps of 1/8 give many equal probabilities
            for (p) |*v| v.* = @floatCast(@round(rnd.floatNorm(f64) * spread * 8) / 8);
            probabilities(p);
            for ([_]f32{ 0.1, 0.5, 0.9, 0.99 }) |topp| {
                for (0..20) |k| {
                    const coin = @as(f32, @floatFromInt(k)) / 20 + 0.01;
                    try std.testing.expectEqual(try referenceTopp(gpa, p, topp, coin), sampleTopp(p, topp, coin, buf, keys));
                }
            }
            // a coin just under the running sum at i picks i, where p[i] moved it
            var cdf: f32 = 0;
            for (p, 0..) |v, i| {
                const before = cdf;
                cdf += v;
                if (cdf > before) try std.testing.expectEqual(@as(u32, @intCast(i)), sampleMult(p, std.math.nextAfter(f32, cdf, 0)));
            }
        }
    }
    // no candidates: topp so small that (1 - topp) / (n - 1) is above every
    // probability; llama2.c reads outside its array, this takes the most probable
    var few = [_]f32{ 0.3, 0.36, 0.34 };
    var buf: [3]f32 = undefined;
    var keys: [6]u64 = undefined;
    try std.testing.expectEqual(@as(u32, 1), sampleTopp(&few, 1e-6, 0.5, &buf, &keys));
}

test "decode and printable: llama2.c's decode and safe_printf" {
    // sscanf(p, "<0x%02hhX>", &b): two characters at most, after whitespace; a sign; "0x" is 0
    try std.testing.expectEqual(@as(?u8, 0x41), scanBytePiece("<0x41>"));
    try std.testing.expectEqual(@as(?u8, 0xab), scanBytePiece("<0xab>"));
    try std.testing.expectEqual(@as(?u8, 0x4), scanBytePiece("<0x4>"));
    try std.testing.expectEqual(@as(?u8, 0x12), scanBytePiece("<0x123>"));
    try std.testing.expectEqual(@as(?u8, 0x41), scanBytePiece("<0x \t41>"));
    try std.testing.expectEqual(@as(?u8, 0xff), scanBytePiece("<0x-1>"));
    try std.testing.expectEqual(@as(?u8, 0x0f), scanBytePiece("<0x+F>"));
    try std.testing.expectEqual(@as(?u8, 0), scanBytePiece("<0x0x>"));
    try std.testing.expectEqual(@as(?u8, null), scanBytePiece("<0xZZ>"));
    try std.testing.expectEqual(@as(?u8, null), scanBytePiece("<0x"));
    try std.testing.expectEqual(@as(?u8, null), scanBytePiece("<0X41>"));
    // one byte prints if isprint or isspace (C locale); anything longer prints
    for ("a~ \t\n\x0b\x0c\r") |c| try std.testing.expect(printable(&.{c}));
    for ("\x00\x01\x08\x0e\x1f\x7f\x80\xc3\xff") |c| try std.testing.expect(!printable(&.{c}));
    try std.testing.expect(!printable(""));
    try std.testing.expect(printable("\xc3\xa9"));

    const pieces = [_][]const u8{ "<unk>", "\n<s>\n", "\n</s>\n", "<0x41>", "<0x0A>", " hi", "a\x00b", "<0x20>" };
    var file: std.ArrayList(u8) = .empty;
    defer file.deinit(std.testing.allocator);
    try file.appendSlice(std.testing.allocator, &std.mem.toBytes(@as(i32, 8)));
    for (pieces) |piece| {
        try file.appendSlice(std.testing.allocator, &std.mem.toBytes(@as(f32, 0)));
        try file.appendSlice(std.testing.allocator, &std.mem.toBytes(@as(i32, @intCast(piece.len))));
        try file.appendSlice(std.testing.allocator, piece);
    }
    var diag: Diagnostic = .{};
    var tok = try Tokenizer.init(std.testing.allocator, file.items, pieces.len, "t.bin", &diag);
    defer tok.deinit();
    try std.testing.expectEqualStrings("A", tok.decode(bos, 3));
    try std.testing.expectEqualStrings("\n", tok.decode(5, 4));
    try std.testing.expectEqualStrings("hi", tok.decode(bos, 5)); // the leading space goes after BOS
    try std.testing.expectEqualStrings(" hi", tok.decode(3, 5));
    try std.testing.expectEqualStrings("a", tok.decode(3, 6)); // a C string ends at NUL
    try std.testing.expectEqualStrings(" ", tok.decode(bos, 7)); // a byte piece keeps its space
    try std.testing.expectEqualStrings("\n<s>\n", tok.decode(3, bos));
    try std.testing.expectEqualStrings("\n</s>\n", tok.decode(3, eos));
}

test "fp16 cache: every finite half converts back exactly, and toF16 rounds as @floatCast, saturating" {
    var h: u32 = 0;
    while (h < 0x10000) : (h += 1) {
        const half: f16 = @bitCast(@as(u16, @intCast(h)));
        if (std.math.isNan(half) or std.math.isInf(half)) continue;
        const want: f32 = half;
        const v: [f32_lanes]u16 = @splat(@intCast(h));
        try std.testing.expectEqual(@as(u32, @bitCast(want)), @as(u32, @bitCast(fromF16(@intCast(h)))));
        try std.testing.expectEqual(@as(u32, @bitCast(want)), @as(u32, @bitCast(loadF16(f32_lanes, &v, 0)[f32_lanes - 1])));
        try std.testing.expectEqual(@as(u16, @intCast(h)), toF16(want));
    }
    // float32 bit patterns from 2^-27 to 65504 (subnormal and normal halves, ties included)
    var u: u32 = (127 - 27) << 23;
    while (u < 0x477fe000) : (u += 977) {
        const f: f32 = @bitCast(u);
        const want: f16 = @floatCast(f);
        try std.testing.expectEqual(@as(u16, @bitCast(want)), toF16(f));
        try std.testing.expectEqual(@as(u16, @bitCast(-want)), toF16(-f));
    }
    for ([_]f32{ 65519.99, 65520, 1e30, std.math.inf(f32) }) |f| {
        try std.testing.expectEqual(@as(u16, 0x7bff), toF16(f));
        try std.testing.expectEqual(@as(u16, 0xfbff), toF16(-f));
    }
}

test "readHeader: norm_eps and rope_theta from a v1 header, 0 for the defaults, NaN/inf/negative/subnormal refused" {
    // dim 2, hidden_dim 2, one layer, head, KV head, token and position: 36 floats after the header
    var file: [256 + 4 * 36]u8 = @splat(0);
    std.mem.writeInt(u32, file[0..4], magic, .little);
    std.mem.writeInt(i32, file[4..8], 1, .little);
    for (0..7) |i| std.mem.writeInt(i32, file[8 + 4 * i ..][0..4], if (i < 2) 2 else 1, .little);
    file[36] = 1;
    var diag: Diagnostic = .{};
    var h = try readHeader(&file, "m.bin", &diag);
    try std.testing.expectEqual(default_norm_eps, h.norm_eps);
    try std.testing.expectEqual(default_rope_theta, h.rope_theta);
    std.mem.writeInt(u64, file[64..72], @bitCast(@as(f64, 1e-6)), .little);
    std.mem.writeInt(u64, file[72..80], @bitCast(@as(f64, 500000.0)), .little);
    h = try readHeader(&file, "m.bin", &diag);
    try std.testing.expectEqual(@as(f64, 1e-6), h.norm_eps);
    try std.testing.expectEqual(@as(f64, 500000.0), h.rope_theta);
    for ([_]f64{ std.math.nan(f64), std.math.inf(f64), -1.0, 1e39, 1e-39, 5e-324 }) |bad| {
        std.mem.writeInt(u64, file[72..80], @bitCast(bad), .little);
        try std.testing.expectError(error.BadModel, readHeader(&file, "m.bin", &diag));
        try std.testing.expect(std.mem.indexOf(u8, diag.msg, "m.bin: bad header: rope_theta") != null);
    }
}

test "settings: decimal text only, judged on the f32 it rounds to, the same rules as run.c" {
    var diag: Diagnostic = .{};
    for ([_][]const u8{ "0", "-0", "+0.0", "1", "1.", ".5", "1e-6", "1E6", "0.000001", "1e+6", "999999.9" }) |text|
        _ = try parseTemperature(text, .flag, &diag);
    for ([_][]const u8{ "1e-7", "1e-45", "1e-400", "0.0000000000000000000000000000000000000000000000001", "-1", "-1e-6", "1e39", "1e999", "1000001" }) |text| {
        try std.testing.expectError(error.BadInput, parseTemperature(text, .flag, &diag));
        try std.testing.expect(std.mem.startsWith(u8, diag.msg, "-t: " ++ temperature_rule ++ ", got '"));
    }
    for ([_][]const u8{ "", "nan", "inf", "-inf", "infinity", "0x10", "1_0", " 1", "1 ", "e5", ".", "-", "1e", "1e+", "1.0f", "１" }) |text| {
        try std.testing.expectError(error.BadInput, parseTemperature(text, .setting, &diag));
        try std.testing.expect(std.mem.startsWith(u8, diag.msg, "temperature: expected a number, got '"));
    }
    for ([_][]const u8{ "0", "1", "1e-6", "0.9", "-0" }) |text| _ = try parseTopp(text, .flag, &diag);
    for ([_][]const u8{ "1e-7", "1e-38", "1.0000001", "-0.1", "2", "1e39" }) |text| {
        try std.testing.expectError(error.BadInput, parseTopp(text, .setting, &diag));
        try std.testing.expect(std.mem.startsWith(u8, diag.msg, topp_rule));
    }
    // a rule on the bits holds for NaN, infinities and subnormals alike
    for ([_]f32{ std.math.nan(f32), std.math.inf(f32), -std.math.inf(f32), std.math.floatTrueMin(f32), -1e-6 }) |x| {
        try std.testing.expect(!temperatureOk(x) and !toppOk(x));
    }
    try std.testing.expectEqual(@as(u64, std.math.maxInt(u64)), try parseSeed("18446744073709551615", .flag, &diag));
    try std.testing.expectEqual(@as(u64, 0), try parseSeed("-0", .flag, &diag));
    for ([_][]const u8{ "18446744073709551616", "-4", "1.5", "0x10", "", "+" }) |text| {
        try std.testing.expectError(error.BadInput, parseSeed(text, .flag, &diag));
        try std.testing.expect(std.mem.startsWith(u8, diag.msg, "-s: seed must be an integer in 0..18446744073709551615"));
    }
    try std.testing.expectError(error.BadInput, parseSteps("12x", .setting, &diag));
    try std.testing.expectEqualStrings("steps: expected an integer, got '12x'", diag.msg);
}

test "stepsFor: 0 means seq_len, and so does anything outside 0..most (which it says); -k's range" {
    const cases = [_]struct { text: []const u8, steps: usize, outside: bool }{
        .{ .text = "0", .steps = 64, .outside = false },
        .{ .text = "-0", .steps = 64, .outside = false },
        .{ .text = "10", .steps = 10, .outside = false },
        .{ .text = "64", .steps = 64, .outside = false },
        .{ .text = "65", .steps = 64, .outside = true },
        .{ .text = "-5", .steps = 64, .outside = true },
        .{ .text = "99999999999999999999", .steps = 64, .outside = true },
    };
    for (cases) |c| {
        const n = stepsFor(parseInteger(c.text).?, 64, 64);
        try std.testing.expectEqual(c.steps, n.steps);
        try std.testing.expectEqual(c.outside, n.outside);
    }
    // with the context shift (-k), past seq_len
    try std.testing.expectEqual(@as(usize, 1000), stepsFor(parseInteger("1000").?, 64, most_shifted).steps);
    try std.testing.expect(stepsFor(parseInteger("2147483647").?, 64, most_shifted).outside);
    var diag: Diagnostic = .{};
    try std.testing.expectEqual(@as(usize, 63), try parseKeep("63", 64, &diag));
    for ([_][]const u8{ "64", "-1", "1.5", "", "99999999999999999999" }) |text| {
        try std.testing.expectError(error.BadInput, parseKeep(text, 64, &diag));
        try std.testing.expect(std.mem.startsWith(u8, diag.msg, "-k: expected an integer in 0..63 (seq_len - 1), got '"));
    }
}

test "firstNonFinite finds NaN and infinities on the bits, in any block, and nothing else" {
    var p: [10000]f32 = undefined;
    for (&p, 0..) |*x, i| x.* = @as(f32, @floatFromInt(i)) * 1e30 - 3e33; // large, finite
    p[17] = std.math.floatMax(f32);
    p[18] = std.math.floatTrueMin(f32);
    try std.testing.expectEqual(@as(?usize, null), firstNonFinite(&p));
    for ([_]usize{ 0, 4095, 4096, 9999 }) |at| {
        for ([_]f32{ std.math.nan(f32), -std.math.nan(f32), std.math.inf(f32), -std.math.inf(f32) }) |bad| {
            const keep = p[at];
            p[at] = bad;
            try std.testing.expectEqual(@as(?usize, at), firstNonFinite(&p));
            p[at] = keep;
        }
    }
    var diag: Diagnostic = .{};
    p[4100] = std.math.nan(f32);
    try std.testing.expectError(error.BadModel, checkTensor(&p, "wq", 3, true, "m.bin", &diag));
    try std.testing.expectEqualStrings("m.bin: wq of layer 3: NaN or infinity in its scales (group 4100)", diag.msg);
}

test "tokenizer.bin: its size is bounded by vocab_size pieces of max_token_length bytes, each piece too" {
    var diag: Diagnostic = .{};
    var head: [4]u8 = undefined;
    std.mem.writeInt(i32, &head, 5, .little);
    try std.testing.expectEqual(@as(usize, 5), try Tokenizer.checkSize(&head, 4 + 3 * 13, 3, "t.bin", &diag));
    try std.testing.expectError(error.BadTokenizer, Tokenizer.checkSize(&head, 4 + 3 * 13 + 1, 3, "t.bin", &diag));
    try std.testing.expectEqualStrings("t.bin: file is 44 bytes, more than 3 pieces of at most max_token_length 5 bytes fill (43): it does not fit the model's vocab_size 3", diag.msg);
    try std.testing.expectError(error.BadTokenizer, Tokenizer.checkSize(&head, 1 << 40, 32000, "t.bin", &diag));
    // pieces of 4, 5 and 6 bytes under a max_token_length of 5 (within the size bound)
    var file: [4 + 3 * 8 + 15]u8 = @splat('a');
    std.mem.writeInt(i32, file[0..4], 5, .little);
    for ([_]i32{ 4, 5, 6 }, [_]usize{ 4, 16, 29 }) |len, off| {
        std.mem.writeInt(u32, file[off..][0..4], 0, .little);
        std.mem.writeInt(i32, file[off + 4 ..][0..4], len, .little);
    }
    try std.testing.expectError(error.BadTokenizer, Tokenizer.init(std.testing.allocator, &file, 3, "t.bin", &diag));
    try std.testing.expectEqualStrings("t.bin: piece 2 has bad length 6 (must be 0..max_token_length 5)", diag.msg);
}

test "encode the texts of ./encode-texts.bin, when there is one, into ./encode-ids.txt" {
    // How tests/runtimes/test_encoder.py reaches the encoder (natively and as WebAssembly) without
    // a command-line flag: it writes encode-tokenizer.bin and encode-texts.bin (u32 vocab_size,
    // then for each text a u32 length and its bytes), runs these tests there, and compares each
    // line of ids (or "error: message") with SentencePiece's. Elsewhere this does nothing.
    const gpa = std.testing.allocator;
    const io = std.testing.io;
    const cwd = Io.Dir.cwd();
    const input = cwd.readFileAlloc(io, "encode-texts.bin", gpa, .unlimited) catch |e| switch (e) {
        error.FileNotFound => return,
        else => return e,
    };
    defer gpa.free(input);
    const tok_data = try cwd.readFileAlloc(io, "encode-tokenizer.bin", gpa, .unlimited);
    defer gpa.free(tok_data);
    var diag: Diagnostic = .{};
    var tok = try Tokenizer.init(gpa, tok_data, readInt(u32, input, 0), "encode-tokenizer.bin", &diag);
    defer tok.deinit();
    var out: std.ArrayList(u8) = .empty;
    defer out.deinit(gpa);
    var off: usize = 4;
    while (off < input.len) {
        const text = input[off + 4 ..][0..readInt(u32, input, off)];
        off += 4 + text.len;
        if (tok.encode(gpa, text, true, false, &diag)) |ids| {
            defer gpa.free(ids);
            for (ids, 0..) |id, k| try out.print(gpa, "{s}{d}", .{ if (k == 0) "" else " ", id });
            try out.append(gpa, '\n');
        } else |_| try out.print(gpa, "error: {s}\n", .{diag.msg});
    }
    try cwd.writeFile(io, .{ .sub_path = "encode-ids.txt", .data = out.items });
}
