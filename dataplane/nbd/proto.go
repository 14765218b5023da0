package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// Magic numbers.
const (
	nbdMagic          uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic          uint64 = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic     uint64 = 0x0003e889045565a9
	requestMagic      uint32 = 0x25609513
	simpleReplyMagic  uint32 = 0x67446698
	requestHeaderSize        = 28
	replyHeaderSize          = 16
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle   uint16 = 1 << 0
	flagNoZeroes        uint16 = 1 << 1
	clientFixedNewstyle uint32 = 1 << 0
	clientNoZeroes      uint32 = 1 << 1
	clientKnownFlags           = clientFixedNewstyle | clientNoZeroes
)

// Option types.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types.
const (
	repAck    uint32 = 1
	repServer uint32 = 2
	repInfo   uint32 = 3

	repErrUnsup    uint32 = 1<<31 + 1
	repErrPolicy   uint32 = 1<<31 + 2
	repErrInvalid  uint32 = 1<<31 + 3
	repErrTLSReqd  uint32 = 1<<31 + 5
	repErrUnknown  uint32 = 1<<31 + 6
	repErrShutdown uint32 = 1<<31 + 7
	repErrTooBig   uint32 = 1<<31 + 9
)

// Info types for NBD_OPT_INFO / NBD_OPT_GO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Transmission flags.
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagCanMultiConn    uint16 = 1 << 8
)

// Commands.
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdWriteZeroes uint16 = 6
)

// Command flags.
const (
	CmdFlagFUA    uint16 = 1 << 0
	CmdFlagNoHole uint16 = 1 << 1
)

// Errno values on the wire (the protocol fixes these numbers, whatever the
// host's errno values are).
const (
	errnoEPERM     uint32 = 1
	errnoEIO       uint32 = 5
	errnoENOMEM    uint32 = 12
	errnoEINVAL    uint32 = 22
	errnoENOSPC    uint32 = 28
	errnoEOVERFLOW uint32 = 75
	errnoENOTSUP   uint32 = 95
	errnoESHUTDOWN uint32 = 108
)

// Limits of the negotiation phase.
const (
	maxOptionLen     = 64 << 10 // larger options get NBD_REP_ERR_TOO_BIG
	maxDiscardOption = 1 << 20  // beyond this an oversized option closes the connection
	maxStringLen     = 4096     // protocol limit for names and messages
)

// Errors a Backend or an Exports may return (wrapped or not) to choose the
// NBD error the client sees.
var (
	// ErrReadOnly is returned for writes to a read-only export; clients see EPERM.
	ErrReadOnly = errors.New("export is read-only")
	// ErrShuttingDown makes the client see ESHUTDOWN (commands) or
	// NBD_REP_ERR_SHUTDOWN (Lookup).
	ErrShuttingDown = errors.New("server is shutting down")
	// ErrUnknownExport is the usual Lookup refusal; clients see
	// NBD_REP_ERR_UNKNOWN. Any Lookup error not matching ErrPolicy or
	// ErrShuttingDown is reported the same way.
	ErrUnknownExport = errors.New("unknown export")
	// ErrPolicy marks a Lookup refusal by policy; clients see NBD_REP_ERR_POLICY.
	ErrPolicy = errors.New("refused by policy")
	// ErrProtocol wraps the reason a connection was closed for a protocol
	// violation (bad magic, oversized payload, unknown client flags...).
	ErrProtocol = errors.New("nbd protocol violation")
)

// request is the decoded 28-byte request header.
type requestHeader struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// decodeRequest decodes a request header, checking its magic.
func decodeRequest(b []byte) (requestHeader, error) {
	if len(b) < requestHeaderSize {
		return requestHeader{}, fmt.Errorf("%w: short request header (%d bytes)", ErrProtocol, len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != requestMagic {
		return requestHeader{}, fmt.Errorf("%w: bad request magic 0x%08x", ErrProtocol, m)
	}
	return requestHeader{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Handle: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// putReplyHeader encodes a simple reply header into b[:16].
func putReplyHeader(b []byte, errno uint32, handle uint64) {
	binary.BigEndian.PutUint32(b[0:4], simpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], handle)
}

// errnoFor maps a backend error to the NBD error sent to the client.
func errnoFor(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errnoENOSPC
	case errors.Is(err, ErrReadOnly), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES):
		return errnoEPERM
	case errors.Is(err, syscall.EINVAL):
		return errnoEINVAL
	case errors.Is(err, context.Canceled), errors.Is(err, ErrShuttingDown), errors.Is(err, syscall.ESHUTDOWN):
		return errnoESHUTDOWN
	case errors.Is(err, syscall.ENOMEM):
		return errnoENOMEM
	case errors.Is(err, syscall.EOVERFLOW):
		return errnoEOVERFLOW
	case errors.Is(err, syscall.ENOTSUP):
		return errnoENOTSUP
	default:
		return errnoEIO
	}
}

// CommandName returns the protocol name of a command type, e.g. "NBD_CMD_READ".
func CommandName(t uint16) string {
	switch t {
	case CmdRead:
		return "NBD_CMD_READ"
	case CmdWrite:
		return "NBD_CMD_WRITE"
	case CmdDisc:
		return "NBD_CMD_DISC"
	case CmdFlush:
		return "NBD_CMD_FLUSH"
	case CmdTrim:
		return "NBD_CMD_TRIM"
	case CmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	default:
		return fmt.Sprintf("NBD_CMD_%d", t)
	}
}

// optionName returns the protocol name of an option, for logs.
func optionName(o uint32) string {
	switch o {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optAbort:
		return "NBD_OPT_ABORT"
	case optList:
		return "NBD_OPT_LIST"
	case optStartTLS:
		return "NBD_OPT_STARTTLS"
	case optInfo:
		return "NBD_OPT_INFO"
	case optGo:
		return "NBD_OPT_GO"
	case optStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	case optExtendedHeaders:
		return "NBD_OPT_EXTENDED_HEADERS"
	default:
		return fmt.Sprintf("NBD_OPT_%d", o)
	}
}
