//! run_web.zig: run.zig for the browser (wasm32-freestanding, SIMD128), as a
//! small exported API that web/worker.js drives one token at a time:
//!
//!   alloc(n) -> ptr, copy model.bin / tokenizer.bin in, load(...) -> 0 | -1,
//!   start(prompt, settings) -> prompt tokens | -1, where settings is the text of
//!   the temperature, top-p, seed and steps fields, one a line (read by the
//!   command line's rules: the same values are refused with the same words),
//!   step() -> next token id | -1 at the end | -2 on error,
//!   piecePtr()/pieceLen(): that token's bytes; errorPtr()/errorLen(): the message.
//!
//! The model bytes stay in wasm memory for the Transformer's lifetime (its
//! weights point into them), so load() takes ownership of that buffer.
//!
//! Built with threads (`-fno-single-threaded`, shared memory imported from
//! JavaScript: web/llama-threads.wasm), it also exports
//!
//!   threads(n) -> 0 | -1: split the matmuls over n threads from the next load,
//!   helperStack() -> ptr, helperMain(index, stack): the entry point of each of
//!   the n - 1 helper Web Workers (web/helper.js), which never returns.

const std = @import("std");
const run = @import("run.zig");

const builtin = @import("builtin");
const threaded = !builtin.single_threaded;
const gpa = if (threaded) PageBlocks.allocator else std.heap.wasm_allocator;
const buffer_alignment: std.mem.Alignment = .@"64";

var diag: run.Diagnostic = .{};
var loaded: ?Loaded = null;
var session: ?Session = null;
var piece: []const u8 = "";

const Loaded = struct {
    model_bytes: []align(64) u8,
    transformer: run.Transformer,
    tokenizer: run.Tokenizer,

    fn deinit(l: *Loaded) void {
        l.tokenizer.deinit();
        l.transformer.pool = null; // the helpers outlive the model
        l.transformer.deinit();
        gpa.free(l.model_bytes);
    }
};

const Session = struct {
    prompt: []u32,
    sampler: run.Sampler,
    generator: run.Generator,
    prev: u32,

    fn deinit(s: *Session) void {
        s.sampler.deinit(gpa);
        gpa.free(s.prompt);
    }
};

/// A 64-byte aligned buffer for JavaScript to fill; null when out of memory.
export fn alloc(len: usize) ?[*]u8 {
    const buf = gpa.alignedAlloc(u8, buffer_alignment, @max(len, 1)) catch return null;
    return buf.ptr;
}

export fn free(ptr: [*]align(64) u8, len: usize) void {
    gpa.free(ptr[0..@max(len, 1)]);
}

export fn errorPtr() [*]const u8 {
    return diag.msg.ptr;
}
export fn errorLen() usize {
    return diag.msg.len;
}
export fn piecePtr() [*]const u8 {
    return piece.ptr;
}
export fn pieceLen() usize {
    return piece.len;
}

/// Header field i of the loaded model: dim, hidden_dim, n_layers, n_heads,
/// n_kv_heads, vocab_size, seq_len, then version and group size; -1 if none.
export fn configField(i: u32) i32 {
    const t = &(loaded orelse return -1).transformer;
    const c = t.config;
    const fields = [_]usize{ c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len, t.version, t.group_size };
    return if (i < fields.len) @intCast(fields[i]) else -1;
}

/// Load a model (taking its buffer, from alloc) and a tokenizer (copied; the
/// caller frees its buffer). Replaces whatever was loaded. 0, or -1 with errorPtr().
export fn load(model_ptr: [*]align(64) u8, model_len: usize, tok_ptr: [*]const u8, tok_len: usize) i32 {
    unload();
    const model_bytes = model_ptr[0..@max(model_len, 1)];
    loadModel(model_bytes, model_len, tok_ptr[0..tok_len]) catch {
        gpa.free(model_bytes);
        return -1;
    };
    return 0;
}

fn loadModel(model_bytes: []align(64) u8, model_len: usize, tok: []const u8) run.Error!void {
    var transformer = try run.Transformer.init(gpa, model_bytes[0..model_len], "model.bin", true, &diag);
    errdefer transformer.deinit();
    if (threaded) transformer.pool = pool;
    const tokenizer = try run.Tokenizer.init(gpa, tok, transformer.config.vocab_size, "tokenizer.bin", &diag);
    loaded = .{ .model_bytes = model_bytes, .transformer = transformer, .tokenizer = tokenizer };
}

fn unload() void {
    endSession();
    if (loaded) |*l| l.deinit();
    loaded = null;
}

fn endSession() void {
    if (session) |*s| s.deinit();
    session = null;
}

/// Begin a generation (the prompt is UTF-8 text). Steps outside 1..seq_len
/// mean seq_len. Returns the number of prompt tokens (BOS included), or -1.
export fn start(prompt_ptr: [*]const u8, prompt_len: usize, settings_ptr: [*]const u8, settings_len: usize) i32 {
    endSession();
    const n = startSession(prompt_ptr[0..prompt_len], settings_ptr[0..settings_len]) catch return -1;
    return @intCast(n);
}

fn startSession(text: []const u8, settings: []const u8) run.Error!usize {
    const l = &(loaded orelse return diag.fail(error.BadInput, "no model loaded", .{}));
    var fields = std.mem.splitScalar(u8, settings, '\n');
    const temperature = try run.parseTemperature(fields.first(), .setting, &diag);
    const topp = try run.parseTopp(fields.next() orelse "", .setting, &diag);
    const seed = try run.parseSeed(fields.next() orelse "", .setting, &diag);
    const steps = try run.parseSteps(fields.next() orelse "", .setting, &diag);
    const t = &l.transformer;
    const seq_len = t.config.seq_len;
    const prompt = try l.tokenizer.encode(gpa, text, true, false, &diag);
    errdefer gpa.free(prompt);
    if (prompt.len > seq_len) return diag.fail(error.BadInput, "prompt encodes to {d} tokens, more than seq_len {d}", .{ prompt.len, seq_len });
    var sampler = try run.Sampler.init(gpa, t.config.vocab_size, temperature, topp, seed);
    errdefer sampler.deinit(gpa);
    const n_steps = run.stepsFor(steps, seq_len, seq_len).steps;
    session = .{ .prompt = prompt, .sampler = sampler, .generator = undefined, .prev = prompt[0] };
    const s = &session.?;
    s.generator = try run.Generator.init(t, &s.sampler, s.prompt, n_steps, &diag);
    return prompt.len;
}

/// One forward pass: the next token id (its text in piecePtr/pieceLen),
/// -1 when the generation is over, -2 on error.
export fn step() i32 {
    const s = &(session orelse return -1);
    const l = &loaded.?;
    const token = s.generator.next(&diag) catch return -2;
    const id = token orelse return -1;
    const p = l.tokenizer.decode(s.prev, id);
    piece = if (run.printable(p)) p else "";
    s.prev = id;
    return @intCast(id);
}

// ------------------------------------------------------------------ threads

/// The threaded module's pool; null until threads() (or with 1 thread).
var pool: ?*run.Pool = null;
const helper_stack_size = 1 << 20;

comptime {
    if (threaded) for (.{ "threads", "helperStack", "helperMain" }) |name| @export(&@field(@This(), name), .{ .name = name });
}

/// Split the matmuls over n threads (the caller and n - 1 helpers) for the
/// models loaded from now on. Once per module. 0, or -1 with errorPtr().
fn threads(n: u32) callconv(.c) i32 {
    if (pool != null) return failed("threads() was already called", .{});
    if (n < 1 or n > 64) return failed("threads must be in 1..64, not {d}", .{n});
    if (n > 1) pool = run.Pool.init(gpa, undefined, n) catch return failed("out of memory for {d} threads", .{n});
    return 0;
}

/// Memory for one helper's stack (every instance of the module starts with
/// the same stack pointer, so each helper needs a stack of its own).
fn helperStack() callconv(.c) ?[*]u8 {
    const stack = gpa.alignedAlloc(u8, .@"16", helper_stack_size) catch return null;
    return stack.ptr;
}

/// A helper Web Worker's entry point, on its own instance of this module over
/// the shared memory: move onto its own stack, then run its part of every
/// job until the module is gone.
fn helperMain(index: u32, stack: [*]u8) callconv(.c) void {
    asm volatile (
        \\ local.get %[top]
        \\ global.set __stack_pointer
        :
        : [top] "r" (stack + helper_stack_size),
    );
    serve(index);
}

fn failed(comptime fmt: []const u8, args: anytype) i32 {
    diag.fail(error.BadInput, fmt, args) catch {};
    return -1;
}

noinline fn serve(index: u32) void {
    if (pool) |p| if (index >= 1 and index <= p.helpers) p.serve(index);
}

/// The threaded module's allocator (Zig's wasm allocator is single-threaded
/// only). Only the generating worker allocates, a few dozen buffers per model,
/// so whole 64 KiB pages do: blocks of 2^k pages, each size with a list of
/// freed blocks for reuse (a freed block holds the address of the next).
const PageBlocks = struct {
    const page = 64 * 1024;
    const allocator: std.mem.Allocator = .{ .ptr = undefined, .vtable = &.{
        .alloc = take,
        .resize = resize,
        .remap = std.mem.Allocator.noRemap,
        .free = give,
    } };
    var free_lists: [17]usize = @splat(0); // 2^0 .. 2^16 pages (4 GiB)

    fn class(len: usize) ?usize {
        const pages = std.math.divCeil(usize, @max(len, 1), page) catch unreachable;
        const k = std.math.log2_int_ceil(usize, pages);
        return if (k < free_lists.len) k else null;
    }

    fn take(_: *anyopaque, len: usize, alignment: std.mem.Alignment, _: usize) ?[*]u8 {
        if (alignment.toByteUnits() > page) return null;
        const k = class(len) orelse return null;
        if (free_lists[k] != 0) {
            const block = free_lists[k];
            free_lists[k] = @as(*const usize, @ptrFromInt(block)).*;
            return @ptrFromInt(block);
        }
        const first = @wasmMemoryGrow(0, @as(usize, 1) << @intCast(k));
        if (first < 0) return null;
        return @ptrFromInt(@as(usize, @intCast(first)) * page);
    }

    fn resize(_: *anyopaque, buf: []u8, _: std.mem.Alignment, new_len: usize, _: usize) bool {
        return class(new_len) == class(buf.len);
    }

    fn give(_: *anyopaque, buf: []u8, _: std.mem.Alignment, _: usize) void {
        const k = class(buf.len).?;
        @as(*usize, @ptrCast(@alignCast(buf.ptr))).* = free_lists[k];
        free_lists[k] = @intFromPtr(buf.ptr);
    }
};
