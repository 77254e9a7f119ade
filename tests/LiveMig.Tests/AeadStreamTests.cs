using System.Security.Cryptography;
using LiveMig.Protocol;
using LiveMig.Transport;

namespace LiveMig.Tests;

/// <summary>The record layer after the TLS handshake: round trips, and every kind of tampering refused by name.</summary>
public class AeadStreamTests
{
    private static readonly DataKeys Keys = DataKeys.Derive(new byte[32], Enumerable.Repeat((byte)1, 32).ToArray(), SHA256.HashData("cert"u8), []);

    /// <summary>What a source writes (records on the wire), for a destination to read.</summary>
    private static byte[] Sealed(params byte[][] writes)
    {
        var wire = new MemoryStream();
        using (var w = new AeadStream(wire, Keys, client: true)) foreach (var b in writes) w.Write(b);
        return wire.ToArray();
    }

    private static AeadStream Reader(byte[] wire) => new(new MemoryStream(wire), Keys, client: false);

    private static byte[] Payload(int n, int seed) { var b = new byte[n]; new Random(seed).NextBytes(b); return b; }

    [Fact]
    public void Records_round_trip_through_large_and_small_reads()
    {
        byte[] big = Payload(AeadStream.MaxRecord * 2 + 123, 1), small = Payload(10, 2);
        byte[] wire = Sealed(big, small);
        Assert.Equal(4 + 16 + 4 + 16 + 4 + 16 + 4 + 16, wire.Length - big.Length - small.Length); // 4 records: header + tag each
        using var r = Reader(wire);
        var got = new MemoryStream();
        var buf = new byte[7000]; // smaller than a record: decrypted into the stream's buffer, then drained
        int n;
        while ((n = r.Read(buf)) > 0) got.Write(buf, 0, n);
        Assert.Equal([.. big, .. small], got.ToArray());
    }

    [Fact]
    public async Task Async_reads_and_writes_give_the_same_bytes()
    {
        byte[] data = Payload(300_000, 3);
        var wire = new MemoryStream();
        await using (var w = new AeadStream(wire, Keys, client: true)) await w.WriteAsync(data);
        await using var r = Reader(wire.ToArray());
        var got = new byte[data.Length];
        await r.ReadExactlyAsync(got);
        Assert.Equal(data, got);
        Assert.Equal(0, await r.ReadAsync(new byte[1])); // a clean end between records
    }

    [Fact]
    public void A_changed_byte_is_refused_as_tampering()
    {
        byte[] wire = Sealed(Payload(1000, 4));
        wire[500] ^= 1;
        using var r = Reader(wire);
        var e = Assert.Throws<ProtocolException>(() => r.Read(new byte[2000]));
        Assert.Equal("TLS record 0 failed authentication: changed, dropped or replayed in transit", e.Message);
    }

    [Fact]
    public void A_replayed_or_dropped_record_is_refused()
    {
        byte[] one = Sealed(Payload(100, 5), Payload(100, 6));
        int record = 4 + 100 + 16;
        byte[] replayed = [.. one[..record], .. one[..record]]; // record 0 twice
        using var r = Reader(replayed);
        Assert.Equal(100, r.Read(new byte[100]));
        Assert.Throws<ProtocolException>(() => r.Read(new byte[100]));
        using var dropped = Reader(one[record..]); // record 1 first
        Assert.Throws<ProtocolException>(() => dropped.Read(new byte[100]));
    }

    [Fact]
    public void Keys_of_the_other_direction_do_not_open_a_record()
    {
        byte[] wire = Sealed(Payload(64, 7));
        using var sameSide = new AeadStream(new MemoryStream(wire), Keys, client: true); // reads with the client's receive key = the server's
        Assert.Throws<ProtocolException>(() => sameSide.Read(new byte[64]));
    }

    [Fact]
    public void An_absurd_length_and_a_cut_record_say_so()
    {
        byte[] huge = [0xFF, 0xFF, 0xFF, 0x7F, .. new byte[32]];
        using (var r = Reader(huge))
            Assert.Equal($"TLS record 0: length 2147483647 outside 1..{AeadStream.MaxRecord} (not a LiveMig peer, or the stream is corrupt)", Assert.Throws<ProtocolException>(() => r.Read(new byte[8])).Message);
        byte[] cut = Sealed(Payload(1000, 8))[..600];
        using (var r = Reader(cut))
            Assert.Equal("the connection closed inside TLS record 0", Assert.Throws<IOException>(() => r.Read(new byte[1000])).Message);
    }

    [Fact]
    public void Keys_depend_on_both_secrets_the_binding_and_the_pre_shared_key()
    {
        byte[] a = new byte[32], b = Enumerable.Repeat((byte)1, 32).ToArray(), bind = SHA256.HashData("cert"u8);
        var k = DataKeys.Derive(a, b, bind, []);
        Assert.NotEqual(k.ClientKey, DataKeys.Derive(b, a, bind, []).ClientKey);
        Assert.NotEqual(k.ClientKey, DataKeys.Derive(a, b, SHA256.HashData("other"u8), []).ClientKey);
        Assert.NotEqual(k.ClientKey, DataKeys.Derive(a, b, bind, [1, 2, 3]).ClientKey);
        Assert.NotEqual(k.ClientKey, k.ServerKey);
        Assert.NotEqual(k.ClientIv, k.ServerIv);
    }
}
