package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/go-logr/logr"
)

// negotiator holds the state of one connection's handshake.
type negotiator struct {
	s        *Server
	c        net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	log      logr.Logger
	noZeroes bool
	// size is the export size told to the client in the reply that ended
	// the negotiation (NBD_OPT_EXPORT_NAME, NBD_OPT_GO): the connection
	// keeps it even if the export grows meanwhile.
	size int64
	// tls is set once NBD_OPT_STARTTLS succeeded: c, br and bw then run
	// over the TLS connection.
	tls bool
}

// negotiated is what a successful negotiation hands to transmission.
type negotiated struct {
	exp  *Export
	name string
	size int64
	// c and br are the connection to carry on with: the TLS connection
	// after NBD_OPT_STARTTLS, else the one accepted.
	c  net.Conn
	br *bufio.Reader
}

// negotiate runs the fixed newstyle handshake. It returns the export to
// serve, the size the client was told and the connection to carry on with,
// or a nil export after NBD_OPT_ABORT, or an error to close on.
func (s *Server) negotiate(ctx context.Context, c net.Conn, br *bufio.Reader, log logr.Logger) (negotiated, error) {
	if err := c.SetDeadline(time.Now().Add(s.handshakeTimeout())); err != nil {
		return negotiated{}, fmt.Errorf("setting handshake deadline: %w", err)
	}
	// Deadlines set on the accepted connection also bound a TLS connection
	// over it.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(aLongTimeAgo) })
	n := &negotiator{s: s, c: c, br: br, bw: bufio.NewWriterSize(c, 4096), log: log}
	exp, name, err := n.run()
	if !stop() {
		return negotiated{}, fmt.Errorf("negotiation interrupted: %w", context.Cause(ctx))
	}
	if err != nil {
		return negotiated{}, err
	}
	if exp != nil {
		if err := c.SetDeadline(time.Time{}); err != nil {
			return negotiated{}, fmt.Errorf("clearing handshake deadline: %w", err)
		}
	}
	return negotiated{exp: exp, name: name, size: n.size, c: n.c, br: n.br}, nil
}

func (n *negotiator) run() (*Export, string, error) {
	var greet [18]byte
	binary.BigEndian.PutUint64(greet[0:8], nbdMagic)
	binary.BigEndian.PutUint64(greet[8:16], optMagic)
	binary.BigEndian.PutUint16(greet[16:18], flagFixedNewstyle|flagNoZeroes)
	if _, err := n.c.Write(greet[:]); err != nil {
		return nil, "", fmt.Errorf("writing greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.br, cf[:]); err != nil {
		return nil, "", fmt.Errorf("reading client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^clientKnownFlags != 0 {
		return nil, "", fmt.Errorf("%w: unknown client flags 0x%08x", ErrProtocol, flags)
	}
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE is served the fixed way
	// anyway (the protocol allows it): option replies only follow options
	// it should not send.
	n.noZeroes = flags&clientNoZeroes != 0

	for {
		var oh [16]byte
		if _, err := io.ReadFull(n.br, oh[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, "", fmt.Errorf("client closed during negotiation: %w", err)
			}
			return nil, "", fmt.Errorf("reading option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(oh[0:8]); m != optMagic {
			return nil, "", fmt.Errorf("%w: bad option magic 0x%016x", ErrProtocol, m)
		}
		opt := binary.BigEndian.Uint32(oh[8:12])
		length := binary.BigEndian.Uint32(oh[12:16])
		if length > maxOptionLen {
			if opt == optExportName || length > maxDiscardOption {
				return nil, "", fmt.Errorf("%w: %s option of %d bytes exceeds %d", ErrProtocol, optionName(opt), length, maxOptionLen)
			}
			if _, err := n.br.Discard(int(length)); err != nil {
				return nil, "", fmt.Errorf("discarding oversized %s option: %w", optionName(opt), err)
			}
			if err := n.replyErr(opt, repErrTooBig, fmt.Sprintf("option data of %d bytes exceeds %d", length, maxOptionLen)); err != nil {
				return nil, "", err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(n.br, data); err != nil {
			return nil, "", fmt.Errorf("reading %s option data: %w", optionName(opt), err)
		}
		if n.s.RequireTLS && !n.tls && opt != optStartTLS && opt != optAbort {
			if opt == optExportName {
				// NBD_OPT_EXPORT_NAME cannot carry an error: close.
				return nil, "", fmt.Errorf("refusing NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: this server requires TLS")
			}
			if err := n.replyErr(opt, repErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first (the agent's --nbd-tls=require)"); err != nil {
				return nil, "", err
			}
			continue
		}
		if opt == optStartTLS && n.s.TLS != nil {
			if err := n.startTLS(data); err != nil {
				return nil, "", err
			}
			continue
		}
		exp, name, done, err := n.option(opt, data)
		if err != nil || done {
			return exp, name, err
		}
	}
}

// option handles one option. done reports that negotiation is over (exp is
// nil after NBD_OPT_ABORT).
func (n *negotiator) option(opt uint32, data []byte) (exp *Export, name string, done bool, err error) {
	log := n.log.WithValues("option", optionName(opt))
	switch opt {
	case optExportName:
		name = string(data)
		e, flags, _, _, _, err := n.resolve(name)
		if err != nil {
			// NBD_OPT_EXPORT_NAME cannot carry an error: close.
			return nil, "", true, fmt.Errorf("refusing export %q requested by NBD_OPT_EXPORT_NAME: %w", name, err)
		}
		var b [10 + 124]byte
		n.size = e.Backend.Size()
		binary.BigEndian.PutUint64(b[0:8], uint64(n.size))
		binary.BigEndian.PutUint16(b[8:10], flags)
		out := b[:]
		if n.noZeroes {
			out = b[:10]
		}
		if _, err := n.bw.Write(out); err != nil {
			return nil, "", true, fmt.Errorf("writing export info: %w", err)
		}
		if err := n.bw.Flush(); err != nil {
			return nil, "", true, fmt.Errorf("writing export info: %w", err)
		}
		log.V(1).Info("Export selected", "export", name)
		return e, name, true, nil

	case optAbort:
		// Best effort: the client may already have gone.
		_ = n.reply(opt, repAck, nil)
		return nil, "", true, nil

	case optList:
		if len(data) != 0 {
			return nil, "", false, n.replyErr(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, nm := range n.s.Exports.List() {
			if len(nm) > maxStringLen {
				continue
			}
			b := make([]byte, 4+len(nm))
			binary.BigEndian.PutUint32(b[0:4], uint32(len(nm)))
			copy(b[4:], nm)
			if err := n.queue(opt, repServer, b); err != nil {
				return nil, "", false, err
			}
		}
		return nil, "", false, n.reply(opt, repAck, nil)

	case optInfo, optGo:
		name, infos, ok := parseInfoRequest(data)
		if !ok {
			return nil, "", false, n.replyErr(opt, repErrInvalid, fmt.Sprintf("malformed %s request of %d bytes", optionName(opt), len(data)))
		}
		e, flags, minB, prefB, maxB, err := n.resolve(name)
		if err != nil {
			return nil, "", false, n.replyErr(opt, lookupReply(err), err.Error())
		}
		var b [18]byte
		size := e.Backend.Size()
		binary.BigEndian.PutUint16(b[0:2], infoExport)
		binary.BigEndian.PutUint64(b[2:10], uint64(size))
		binary.BigEndian.PutUint16(b[10:12], flags)
		if err := n.queue(opt, repInfo, b[:12]); err != nil {
			return nil, "", false, err
		}
		binary.BigEndian.PutUint16(b[0:2], infoBlockSize)
		binary.BigEndian.PutUint32(b[2:6], minB)
		binary.BigEndian.PutUint32(b[6:10], prefB)
		binary.BigEndian.PutUint32(b[10:14], maxB)
		if err := n.queue(opt, repInfo, b[:14]); err != nil {
			return nil, "", false, err
		}
		for _, it := range infos {
			var s string
			switch it {
			case infoName:
				s = e.Name
				if s == "" {
					s = name
				}
			case infoDescription:
				s = e.Description
			default:
				continue // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE already sent; unknown ones ignored.
			}
			s = cleanString(s)
			ib := make([]byte, 2+len(s))
			binary.BigEndian.PutUint16(ib[0:2], it)
			copy(ib[2:], s)
			if err := n.queue(opt, repInfo, ib); err != nil {
				return nil, "", false, err
			}
		}
		if err := n.reply(opt, repAck, nil); err != nil {
			return nil, "", false, err
		}
		if opt == optGo {
			n.size = size
			log.V(1).Info("Export selected", "export", name)
			return e, name, true, nil
		}
		return nil, "", false, nil

	default:
		return nil, "", false, n.replyErr(opt, repErrUnsup, optionName(opt)+" is not supported")
	}
}

// startTLS answers NBD_OPT_STARTTLS on a server with TLS: an
// acknowledgement, then the TLS handshake (Server.TLS decides which client
// certificates it takes), after which the negotiation carries on inside
// TLS. A refused option (data given, TLS already up) keeps the connection; a
// client that sent anything before the acknowledgement, or a failed
// handshake, closes it.
func (n *negotiator) startTLS(data []byte) error {
	switch {
	case n.tls:
		return n.replyErr(optStartTLS, repErrInvalid, "TLS is already negotiated on this connection")
	case len(data) != 0:
		return n.replyErr(optStartTLS, repErrInvalid, fmt.Sprintf("NBD_OPT_STARTTLS takes no data, got %d bytes", len(data)))
	case n.br.Buffered() > 0:
		// The client must wait for the acknowledgement; bytes already here
		// were sent in plain text and cannot be part of the TLS handshake.
		return fmt.Errorf("%w: %d bytes sent after NBD_OPT_STARTTLS before its reply", ErrProtocol, n.br.Buffered())
	}
	if err := n.reply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	tc := tls.Server(n.c, n.s.TLS)
	// The handshake is bounded by the negotiation's deadline on n.c.
	if err := tc.Handshake(); err != nil {
		n.s.stats.tlsFailures.Add(1)
		return fmt.Errorf("TLS handshake after NBD_OPT_STARTTLS: %w", err)
	}
	n.s.stats.tlsConns.Add(1)
	n.c, n.tls = tc, true
	n.br = bufio.NewReaderSize(tc, 64<<10)
	n.bw = bufio.NewWriterSize(tc, 4096)
	n.log = n.log.WithValues("peer", PeerName(tc.ConnectionState()))
	n.log.V(1).Info("TLS negotiated")
	return nil
}

// PeerName names the client certificate of a TLS connection for logs: its
// first URI SAN (Tandem's identities are SPIFFE IDs), else its subject's
// common name, or "anonymous" without a certificate.
func PeerName(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return "anonymous"
	}
	leaf := cs.PeerCertificates[0]
	if len(leaf.URIs) > 0 {
		return leaf.URIs[0].String()
	}
	return "CN=" + leaf.Subject.CommonName
}

// resolve looks an export up and checks it can be served, logging refusals.
func (n *negotiator) resolve(name string) (e *Export, flags uint16, minB, prefB, maxB uint32, err error) {
	log := n.log.WithValues("export", name)
	if len(name) > maxStringLen {
		err = fmt.Errorf("%w: export name of %d bytes exceeds %d", ErrUnknownExport, len(name), maxStringLen)
	} else {
		e, err = n.s.Exports.Lookup(name)
	}
	if err == nil {
		switch {
		case e == nil || e.Backend == nil:
			err = fmt.Errorf("%w: export %q has no backend", ErrUnknownExport, name)
		case e.Backend.Size() < 0:
			err = fmt.Errorf("%w: export %q has negative size %d", ErrUnknownExport, name, e.Backend.Size())
		default:
			minB, prefB, maxB, err = e.blockSizes(n.s.maxPayload())
			if err != nil {
				err = fmt.Errorf("%w: export %q is misconfigured: %w", ErrUnknownExport, name, err)
			} else if e.Admit != nil {
				if aerr := e.Admit(clientAddr(n.c.RemoteAddr())); aerr != nil {
					err = fmt.Errorf("%w: %w", ErrPolicy, aerr)
				}
			}
		}
	}
	if err != nil {
		n.s.stats.refused.Add(1)
		log.Info("Refused export", "reason", err.Error())
		return nil, 0, 0, 0, 0, err
	}
	return e, e.flags(), minB, prefB, maxB, nil
}

// flags returns the transmission flags advertised for e.
func (e *Export) flags() uint16 {
	f := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagCanMultiConn
	if e.ReadOnly {
		f |= FlagReadOnly
	} else {
		f |= FlagSendTrim | FlagSendWriteZeroes
	}
	return f
}

// parseInfoRequest decodes NBD_OPT_INFO / NBD_OPT_GO data: a 32-bit name
// length, the name, a 16-bit count and that many 16-bit info types.
func parseInfoRequest(data []byte) (name string, infos []uint16, ok bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	nl := binary.BigEndian.Uint32(data[0:4])
	if uint64(nl) > uint64(len(data))-6 {
		return "", nil, false
	}
	name = string(data[4 : 4+nl])
	rest := data[4+nl:]
	cnt := int(binary.BigEndian.Uint16(rest[0:2]))
	rest = rest[2:]
	if len(rest) != 2*cnt {
		return "", nil, false
	}
	infos = make([]uint16, cnt)
	for i := range infos {
		infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return name, infos, true
}

// queue buffers one option reply.
func (n *negotiator) queue(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:8], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:12], opt)
	binary.BigEndian.PutUint32(h[12:16], typ)
	binary.BigEndian.PutUint32(h[16:20], uint32(len(data)))
	if _, err := n.bw.Write(h[:]); err != nil {
		return fmt.Errorf("writing %s reply: %w", optionName(opt), err)
	}
	if _, err := n.bw.Write(data); err != nil {
		return fmt.Errorf("writing %s reply: %w", optionName(opt), err)
	}
	return nil
}

// reply sends one option reply along with anything queued.
func (n *negotiator) reply(opt, typ uint32, data []byte) error {
	if err := n.queue(opt, typ, data); err != nil {
		return err
	}
	if err := n.bw.Flush(); err != nil {
		return fmt.Errorf("writing %s reply: %w", optionName(opt), err)
	}
	return nil
}

// replyErr sends an error reply carrying msg.
func (n *negotiator) replyErr(opt, typ uint32, msg string) error {
	n.log.V(1).Info("Option refused", "option", optionName(opt), "reason", msg)
	return n.reply(opt, typ, []byte(cleanString(msg)))
}

// cleanString makes s a protocol string: valid UTF-8 without NULs, at most
// 4096 bytes.
func cleanString(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.ReplaceAll(s, "\x00", "")
	if len(s) <= maxStringLen {
		return s
	}
	cut := maxStringLen
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}
