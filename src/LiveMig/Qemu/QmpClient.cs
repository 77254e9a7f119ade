using System.Collections.Concurrent;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LiveMig.Vm;

namespace LiveMig.Qemu;

/// <summary>QEMU's QMP failed us: QEMU is missing, did not answer in time, closed the connection or died. The message is one line.</summary>
public class QmpException(string message, Exception? inner = null) : VmFailedException(message, inner);

/// <summary>QEMU refused a command: its error <see cref="Class"/> (e.g. GenericError) and description, as QMP gave them.</summary>
public sealed class QmpError(string command, string errorClass, string description)
    : QmpException($"QEMU refused '{command}': {errorClass}: {OneLine(description)}")
{
    public string Command { get; } = command;
    public string Class { get; } = errorClass;
    public string Description { get; } = description;

    internal static string OneLine(string s) => s.ReplaceLineEndings(" ");
}

/// <summary>An asynchronous QMP event (STOP, RESUME, MIGRATION, SHUTDOWN, …) with its data.</summary>
public sealed record QmpEvent(string Name, JsonObject? Data, DateTimeOffset Timestamp);

/// <summary>
/// A client of QEMU's machine protocol over a Unix socket (<c>-qmp unix:PATH,server=on,wait=off</c>),
/// shaped like QEMU's own Python <c>qemu.qmp</c>: connect, read the greeting, negotiate
/// (<c>qmp_capabilities</c>), then commands with ids matched to their answers by a reader task,
/// and events delivered as they come. Every command has a timeout; a refusal is a
/// <see cref="QmpError"/> with QEMU's class and description; a closed connection fails every
/// command waiting and every later one with the reason (usually: QEMU exited).
/// </summary>
public sealed class QmpClient : IDisposable
{
    /// <summary>Longest message accepted from QEMU (a query's answer is a few KiB; this bounds a misbehaving peer).</summary>
    public const int MaxMessageBytes = 8 << 20;
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(10);

    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly ConcurrentDictionary<long, (string Command, TaskCompletionSource<JsonNode?> Answer)> _pending = new();
    private readonly List<(string Name, Func<QmpEvent, bool> Match, TaskCompletionSource<QmpEvent> Seen)> _eventWaiters = [];
    private readonly CancellationTokenSource _closing = new();
    private Task _reader = Task.CompletedTask;
    private long _nextId;
    private volatile string? _closedReason;

    private QmpClient(Socket socket, string path)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        SocketPath = path;
    }

    public string SocketPath { get; }

    /// <summary>QEMU's version from the greeting, e.g. 7.2.22.</summary>
    public string QemuVersion { get; private set; } = "";

    /// <summary>Null while connected; why the connection ended otherwise.</summary>
    public string? ClosedReason => _closedReason;

    /// <summary>Raised on the reader task for every event (keep it short; it must not block).</summary>
    public event Action<QmpEvent>? EventReceived;

    /// <summary>
    /// Connects to QEMU's QMP socket at <paramref name="path"/>, reads the greeting and leaves
    /// capabilities negotiation mode. Retries a socket that is not there yet until
    /// <paramref name="timeout"/> (QEMU creates it while it starts), unless <paramref name="alive"/>
    /// says QEMU has gone meanwhile (then its reason is the error).
    /// </summary>
    public static async Task<QmpClient> ConnectAsync(string path, TimeSpan timeout, Func<string?>? alive = null, CancellationToken cancel = default)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await socket.ConnectAsync(new UnixDomainSocketEndPoint(path), cancel).ConfigureAwait(false);
                var client = new QmpClient(socket, path);
                try
                {
                    await client.NegotiateAsync(deadline - DateTime.UtcNow).ConfigureAwait(false);
                    return client;
                }
                catch { client.Dispose(); throw; }
            }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.AddressNotAvailable or SocketError.ConnectionRefused or SocketError.AddressFamilyNotSupported || !File.Exists(path))
            {
                socket.Dispose();
                if (alive?.Invoke() is { } gone) throw new QmpException($"QEMU {gone} before its QMP socket {path} answered");
                if (DateTime.UtcNow >= deadline) throw new QmpException($"QEMU's QMP socket {path} did not answer within {timeout.TotalSeconds:0.#} s: {e.Message}");
                await Task.Delay(20, cancel).ConfigureAwait(false);
            }
        }
    }

    private async Task NegotiateAsync(TimeSpan timeout)
    {
        if (timeout <= TimeSpan.Zero) timeout = TimeSpan.FromSeconds(1);
        using var cts = new CancellationTokenSource(timeout);
        JsonObject greeting;
        try { greeting = await ReadMessageAsync(cts.Token).ConfigureAwait(false) ?? throw new QmpException($"QMP socket {SocketPath} closed before QEMU's greeting"); }
        catch (OperationCanceledException) { throw new QmpException($"QEMU sent no QMP greeting on {SocketPath} within {timeout.TotalSeconds:0.#} s"); }
        if (greeting["QMP"] is not JsonObject qmp) throw new QmpException($"QMP socket {SocketPath}: the first message is not QEMU's greeting");
        if (qmp["version"]?["qemu"] is JsonObject v) QemuVersion = $"{v["major"]}.{v["minor"]}.{v["micro"]}";
        _reader = Task.Run(ReadLoopAsync);
        await ExecuteAsync("qmp_capabilities", timeout: timeout).ConfigureAwait(false);
    }

    /// <summary>Runs <paramref name="command"/> and returns its "return" value; a <see cref="QmpError"/> when QEMU refuses it, a <see cref="QmpException"/> when it does not answer within the timeout or the connection ends.</summary>
    public async Task<JsonNode?> ExecuteAsync(string command, JsonObject? arguments = null, TimeSpan? timeout = null, CancellationToken cancel = default)
    {
        if (_closedReason is { } closed) throw new QmpException($"cannot run '{command}': {closed}");
        long id = Interlocked.Increment(ref _nextId);
        var answer = new TaskCompletionSource<JsonNode?>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[id] = (command, answer);
        var request = new JsonObject { ["execute"] = command, ["id"] = id };
        if (arguments is not null) request["arguments"] = arguments;
        byte[] line = Encoding.UTF8.GetBytes(request.ToJsonString() + "\n");
        var limit = timeout ?? DefaultTimeout;
        try
        {
            await _writeLock.WaitAsync(cancel).ConfigureAwait(false);
            try { await _stream.WriteAsync(line, cancel).ConfigureAwait(false); }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException) { throw new QmpException($"cannot send '{command}' to QEMU: {_closedReason ?? e.Message}", e); }
            finally { _writeLock.Release(); }
            // A closed connection may have drained the pending table before this command was in it.
            if (_closedReason is { } gone) answer.TrySetException(new QmpException($"'{command}' got no answer: {gone}"));
            return await answer.Task.WaitAsync(limit, cancel).ConfigureAwait(false);
        }
        catch (TimeoutException) { throw new QmpException($"QEMU did not answer '{command}' within {limit.TotalSeconds:0.#} s"); }
        finally { _pending.TryRemove(id, out _); }
    }

    /// <summary><see cref="ExecuteAsync"/> for callers that are not asynchronous (the engine's VM interface).</summary>
    public JsonNode? Execute(string command, JsonObject? arguments = null, TimeSpan? timeout = null) =>
        ExecuteAsync(command, arguments, timeout).GetAwaiter().GetResult();

    /// <summary>
    /// A task that completes with the next event named <paramref name="name"/> that
    /// <paramref name="match"/> accepts; register it before the command that causes the event.
    /// Fails with a <see cref="QmpException"/> when the connection ends first.
    /// </summary>
    public Task<QmpEvent> NextEvent(string name, Func<QmpEvent, bool>? match = null)
    {
        var seen = new TaskCompletionSource<QmpEvent>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_eventWaiters)
        {
            if (_closedReason is { } closed) seen.TrySetException(new QmpException($"no {name} event will come: {closed}"));
            else _eventWaiters.Add((name, match ?? (_ => true), seen));
        }
        return seen.Task;
    }

    private async Task ReadLoopAsync()
    {
        string reason = "QEMU closed its QMP connection (QEMU exited?)";
        try
        {
            while (await ReadMessageAsync(_closing.Token).ConfigureAwait(false) is { } message) Dispatch(message);
        }
        catch (OperationCanceledException) { reason = "the QMP connection was closed here"; }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or QmpException or JsonException)
        {
            reason = $"the QMP connection to QEMU failed: {QmpError.OneLine(e.Message)}";
        }
        Close(reason);
    }

    private void Dispatch(JsonObject message)
    {
        if (message["event"] is JsonValue ev)
        {
            var e = new QmpEvent(ev.GetValue<string>(), message["data"] as JsonObject, Timestamp(message["timestamp"]));
            EventReceived?.Invoke(e);
            lock (_eventWaiters)
                for (int i = _eventWaiters.Count - 1; i >= 0; i--)
                    if (_eventWaiters[i].Name == e.Name && _eventWaiters[i].Match(e)) { _eventWaiters[i].Seen.TrySetResult(e); _eventWaiters.RemoveAt(i); }
            return;
        }
        // An answer without our id (QEMU answers an unparsable request so) cannot be matched: ignore it.
        if (message["id"] is not JsonValue idValue || !idValue.TryGetValue(out long id) || !_pending.TryGetValue(id, out var waiting)) return;
        if (message["error"] is JsonObject error)
            waiting.Answer.TrySetException(new QmpError(waiting.Command, error["class"]?.GetValue<string>() ?? "?", error["desc"]?.GetValue<string>() ?? ""));
        else waiting.Answer.TrySetResult(message["return"]?.DeepClone());
    }

    private static DateTimeOffset Timestamp(JsonNode? t)
    {
        if (t is not JsonObject o || o["seconds"] is not JsonValue s || o["microseconds"] is not JsonValue us) return DateTimeOffset.UtcNow;
        return DateTimeOffset.FromUnixTimeSeconds(s.GetValue<long>()).AddTicks(us.GetValue<long>() * 10);
    }

    private readonly byte[] _readBuffer = new byte[64 << 10];
    private int _readStart, _readEnd;

    /// <summary>The next line from QEMU as a JSON object; null at the end of the stream.</summary>
    private async Task<JsonObject?> ReadMessageAsync(CancellationToken cancel)
    {
        var line = new MemoryStream();
        while (true)
        {
            int nl = Array.IndexOf(_readBuffer, (byte)'\n', _readStart, _readEnd - _readStart);
            int upto = nl >= 0 ? nl : _readEnd;
            line.Write(_readBuffer, _readStart, upto - _readStart);
            if (line.Length > MaxMessageBytes) throw new QmpException($"QEMU sent a QMP message longer than {MaxMessageBytes} bytes");
            if (nl >= 0)
            {
                _readStart = nl + 1;
                if (line.Length == 0 || (line.Length == 1 && line.GetBuffer()[0] == '\r')) continue;
                return JsonNode.Parse(line.GetBuffer().AsSpan(0, (int)line.Length)) as JsonObject ?? throw new QmpException("QEMU sent a QMP message that is not a JSON object");
            }
            _readStart = 0;
            _readEnd = await _stream.ReadAsync(_readBuffer, cancel).ConfigureAwait(false);
            if (_readEnd == 0) return null;
        }
    }

    private void Close(string reason)
    {
        _closedReason ??= reason;
        foreach (var (id, waiting) in _pending)
            if (_pending.TryRemove(id, out _)) waiting.Answer.TrySetException(new QmpException($"'{waiting.Command}' got no answer: {_closedReason}"));
        lock (_eventWaiters)
        {
            foreach (var w in _eventWaiters) w.Seen.TrySetException(new QmpException($"no {w.Name} event will come: {_closedReason}"));
            _eventWaiters.Clear();
        }
    }

    public void Dispose()
    {
        Close("the QMP connection was closed here");
        _closing.Cancel();
        _stream.Dispose();
        try { _reader.Wait(TimeSpan.FromSeconds(2)); } catch (AggregateException) { }
        _closing.Dispose();
    }
}
