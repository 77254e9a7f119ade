namespace LiveMig.Vm;

/// <summary>
/// The VM itself failed — its QEMU refused a command, stopped answering or died — as opposed to
/// the link (an <see cref="IOException"/>, which a resumable migration survives by reconnecting).
/// The engines fail the migration with this message: before the switch-over the source resumes
/// the VM if it can, the destination discards its copy and tells the source why.
/// </summary>
public class VmFailedException(string message, Exception? inner = null) : Exception(message, inner);
