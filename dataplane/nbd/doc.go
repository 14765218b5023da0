// Package nbd is Tandem's NBD server: the frontend through which a client
// (qemu, libnbd, fio, the kernel's nbd-client) reads and writes the active
// primary's copy of a volume.
//
// # Why our own server
//
// Off-the-shelf servers do not give the agent what it needs:
//
//   - many requests in flight per connection, replied to out of order;
//   - exact FLUSH and FUA semantics, because they are where replication
//     (sync mode) and the write-intent bitmap hook in;
//   - a context per request: during a planned failback a write is held (not
//     failed) until roles have switched, and it must be cancelled as soon as
//     the client's connection goes away;
//   - per-export refusal reasons ("member node-b is the backup, not the writer
//     (epoch 3)") that reach the client and the log instead of a bare
//     "unknown export".
//
// # Wire subset implemented
//
// Handshake: fixed newstyle only (no oldstyle). The server advertises
// NBD_FLAG_FIXED_NEWSTYLE and NBD_FLAG_NO_ZEROES; client flags other than
// NBD_FLAG_C_FIXED_NEWSTYLE and NBD_FLAG_C_NO_ZEROES close the connection.
// The whole negotiation must finish within Server.HandshakeTimeout.
//
// Options:
//
//   - NBD_OPT_EXPORT_NAME: enters transmission, or closes the connection when
//     the export is refused (the option cannot carry an error).
//   - NBD_OPT_INFO and NBD_OPT_GO: reply NBD_INFO_EXPORT and
//     NBD_INFO_BLOCK_SIZE always, NBD_INFO_NAME and NBD_INFO_DESCRIPTION when
//     asked for. A refused export gets NBD_REP_ERR_UNKNOWN (or
//     NBD_REP_ERR_POLICY / NBD_REP_ERR_SHUTDOWN, see ErrPolicy and
//     ErrShuttingDown) carrying the text of the Lookup error.
//   - NBD_OPT_LIST: one NBD_REP_SERVER per name from Exports.List.
//   - NBD_OPT_ABORT: NBD_REP_ACK, then close.
//   - NBD_OPT_STARTTLS, on a server with Server.TLS: NBD_REP_ERR_INVALID
//     with data or once TLS is up, else NBD_REP_ACK and a TLS server
//     handshake, after which the negotiation and the transmission phase run
//     inside TLS (Server.TLS decides which client certificates are taken;
//     the agent takes a certificate of its CA bundle naming a Tandem
//     identity). A client that sends anything between the option and its
//     reply is closed. With Server.RequireTLS every option but STARTTLS and
//     ABORT gets NBD_REP_ERR_TLS_REQD before TLS is up, and
//     NBD_OPT_EXPORT_NAME closes the connection. Without Server.TLS,
//     STARTTLS gets NBD_REP_ERR_UNSUP.
//   - Everything else (STRUCTURED_REPLY, meta contexts, extended headers,
//     unknown options): NBD_REP_ERR_UNSUP. Only simple replies are used in
//     transmission.
//
// Option data is capped at 64 KiB (NBD_REP_ERR_TOO_BIG after discarding up to
// 1 MiB, a closed connection beyond that). The empty export name is passed to
// Exports.Lookup as is; an Exports without a default export refuses it.
//
// Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, CAN_MULTI_CONN, plus
// SEND_TRIM and SEND_WRITE_ZEROES for writable exports and READ_ONLY for
// read-only ones. Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with
// NBD_CMD_FLAG_FUA and NBD_CMD_FLAG_NO_HOLE) and DISC. Any other command, or a
// command flag not valid for the command, gets EINVAL and the connection
// carries on. The offset and length of FLUSH (and DISC) are ignored. Reads past the end get EINVAL, writes/trims/zeroes past the end
// ENOSPC, writes to a read-only export EPERM. A WRITE longer than
// Server.MaxPayload cannot be skipped safely: it gets EINVAL, the requests
// already in flight are finished, and the connection is closed with a logged
// reason. A request with a bad magic closes the connection the same way.
//
// # Export size and growth
//
// The export size is read from Backend.Size when the negotiation answers
// NBD_OPT_EXPORT_NAME or NBD_OPT_GO, and the connection keeps that size for
// its whole life: every request is checked against it (past it: EINVAL for
// a read, ENOSPC for a write, trim or zero, as past any end). A Backend may
// grow (a volume expanded online, volume.Grow): NBD has no in-band resize
// notice, so connections open before the grow keep the size they
// negotiated, and a new connection sees the new size. The client side
// (the CSI node plugin) reconnects to use the grown space. A Backend must
// never shrink.
//
// # Concurrency and ordering
//
// One goroutine per connection reads requests (and WRITE payloads into pooled
// buffers) and hands them to up to Server.MaxInFlight workers. A Backend that
// implements BufferTaker gets the payload buffer itself (a replicating backend
// sends it to its peer without a copy) and gives it back when done; the
// number of payload bytes in flight is bounded too, per connection
// (Server.MaxInFlightBytes) and for every connection together
// (Server.Budget, shared with the rest of the agent): a request waits for
// its bytes before its payload is read, and a buffer handed to a
// BufferTaker stays charged until it is given back. Replies
// are sent as requests complete, in any order (clients match them by handle):
// they are queued under a mutex and whichever worker finds no write in
// progress sends the whole queue with one writev. A FLUSH waits for every
// WRITE, TRIM and WRITE_ZEROES received before it on the same connection to
// complete, then calls Backend.Flush; this is stronger than the protocol asks
// (it only requires writes already replied to be covered). Since
// Backend.Flush covers all completed writes of the backend, CAN_MULTI_CONN
// holds as long as every connection to an export shares one Backend.
//
// On NBD_CMD_DISC, and when the context passed to Serve or ServeConn is
// cancelled, the server stops reading, finishes the requests in flight and
// closes the connection. Requests still running Server.DrainTimeout after a
// shutdown began have their contexts cancelled (a cancelled request is
// answered with ESHUTDOWN). Request contexts are also cancelled as soon as
// the client disconnects or a reply cannot be written.
//
// Backend errors map to NBD errors with errors.Is: ENOSPC, EDQUOT and EFBIG
// to ENOSPC; EPERM, EACCES, EROFS and ErrReadOnly to EPERM; EINVAL to
// EINVAL; ENOMEM to ENOMEM; EOVERFLOW to EOVERFLOW; ENOTSUP to ENOTSUP;
// context.Canceled, ESHUTDOWN and ErrShuttingDown to ESHUTDOWN; anything
// else (including context.DeadlineExceeded) to EIO.
//
// MemBackend is an in-memory Backend with a write-back cache model (Durable,
// Crash) and a Hook for fault injection and holding requests, for this and
// other packages' tests; package nbdtest finds the real NBD clients.
package nbd
