using System.Numerics;
using System.Runtime.CompilerServices;

namespace LiveMig.Workloads;

/// <summary>xoshiro256** — small, fast, and its whole state is four words, so it migrates as vCPU registers.</summary>
public struct Xoshiro256
{
    public ulong S0, S1, S2, S3;

    public Xoshiro256(ulong seed)
    {
        // SplitMix64 expands the seed so that nearby seeds give unrelated streams.
        S0 = SplitMix(ref seed); S1 = SplitMix(ref seed); S2 = SplitMix(ref seed); S3 = SplitMix(ref seed);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)] // the simulator's dirty draws call it per 64-page word: a call each cost 40% of a dirtying run
    public static ulong SplitMix(ref ulong x)
    {
        ulong z = x += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public ulong Next()
    {
        ulong result = BitOperations.RotateLeft(S1 * 5, 7) * 9;
        ulong t = S1 << 17;
        S2 ^= S0; S3 ^= S1; S1 ^= S2; S0 ^= S3; S2 ^= t;
        S3 = BitOperations.RotateLeft(S3, 45);
        return result;
    }

    /// <summary>Uniform in [0, bound) (Lemire's multiply-shift; the tiny bias is irrelevant here).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public long NextBelow(long bound) => (long)Math.BigMul(Next(), (ulong)bound, out _);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public double NextDouble() => (Next() >> 11) * (1.0 / (1UL << 53));

    public readonly void Write(BinaryWriter w) { w.Write(S0); w.Write(S1); w.Write(S2); w.Write(S3); }
    public static Xoshiro256 Read(BinaryReader r) => new() { S0 = r.ReadUInt64(), S1 = r.ReadUInt64(), S2 = r.ReadUInt64(), S3 = r.ReadUInt64() };
}
