package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// fuzzPrefix is a valid handshake up to the transmission phase: client
// flags, then NBD_OPT_GO for testExport.
func fuzzPrefix() []byte {
	b := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	return append(b, encodeOption(optGo, encodeInfoRequest(testExport, infoBlockSize))...)
}

func joinBytes(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// FuzzRequest feeds arbitrary bytes to a server connection as the client's
// side of a session and requires the server neither panics nor hangs, and
// checks the request header and NBD_OPT_GO decoders. The first input byte
// selects the mode: odd prepends a valid handshake (fuzzing the
// transmission phase), even fuzzes the negotiation from the client flags on.
func FuzzRequest(f *testing.F) {
	req := func(typ, flags uint16, off uint64, length uint32, payload ...byte) []byte {
		return append(encodeRequest(typ, flags, 7, off, length), payload...)
	}
	// Transmission phase seeds (mode 1).
	for _, s := range [][]byte{
		req(CmdRead, 0, 0, 512),
		joinBytes(req(CmdWrite, CmdFlagFUA, 4096, 8, 1, 2, 3, 4, 5, 6, 7, 8), req(CmdFlush, 0, 0, 0), req(CmdRead, 0, 4096, 8), req(CmdDisc, 0, 0, 0)),
		joinBytes(req(CmdTrim, 0, 0, 4096), req(CmdWriteZeroes, CmdFlagNoHole, 0, 4096), req(CmdWriteZeroes, 0, 1<<20-1, 1)),
		req(CmdWrite, 0, 0, 1<<30),                                  // oversized payload
		req(CmdWrite, 0, 0, 4096, 1, 2, 3),                          // truncated payload
		req(CmdRead, 0, 1<<20-1, 2),                                 // past the end
		req(99, 0xffff, 1<<63, 0xffffffff),                          // unknown command, all flags
		append([]byte{0x25, 0x60, 0x95, 0x14}, make([]byte, 24)...), // bad magic
		joinBytes(req(CmdRead, 0, 0, 65536), req(CmdRead, 0, 65536, 65536), req(CmdRead, 0, 0, 1)),
	} {
		f.Add(append([]byte{1}, s...))
	}
	// Negotiation seeds (mode 0).
	flags := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle)
	for _, s := range [][]byte{
		joinBytes(flags, encodeOption(optExportName, []byte(testExport)), req(CmdRead, 0, 0, 16)),
		joinBytes(flags, encodeOption(optExportName, nil), req(CmdDisc, 0, 0, 0)),
		joinBytes(flags, encodeOption(optList, nil), encodeOption(optInfo, encodeInfoRequest(testExport, 0, 1, 2, 3)), encodeOption(optAbort, nil)),
		joinBytes(flags, encodeOption(optStructuredReply, nil), encodeOption(optGo, encodeInfoRequest("ns/none")), encodeOption(optGo, []byte{0, 0, 0, 200, 'x', 0, 0})),
		joinBytes(flags, encodeOption(optGo, make([]byte, maxOptionLen+1))),
		joinBytes(flags, encodeOption(optGo, nil)[:12], []byte{0xff, 0xff, 0xff, 0xff}),
		joinBytes(binary.BigEndian.AppendUint32(nil, 0xffffffff)),
		[]byte("GET / HTTP/1.0\r\n\r\n"),
	} {
		f.Add(append([]byte{0}, s...))
	}

	exports := &StaticExports{}
	exports.Add(testExport, &Export{Backend: NewMemBackend(1 << 20)})
	exports.SetDefault(testExport)
	srv := &Server{Exports: exports, MaxPayload: 64 << 10, MaxInFlight: 8, HandshakeTimeout: 2 * time.Second}
	prefix := fuzzPrefix()

	f.Fuzz(func(t *testing.T, data []byte) {
		if h, err := decodeRequest(data); err == nil {
			if re := encodeRequest(h.Type, h.Flags, h.Handle, h.Offset, h.Length); !bytes.Equal(re, data[:requestHeaderSize]) {
				t.Fatalf("request header round trip: % x vs % x", re, data[:requestHeaderSize])
			}
		}
		if name, infos, ok := parseInfoRequest(data); ok {
			if re := encodeInfoRequest(name, infos...); !bytes.Equal(re, data) {
				t.Fatalf("info request round trip: % x vs % x", re, data)
			}
		}
		if len(data) == 0 {
			return
		}
		session := data[1:]
		if data[0]&1 == 1 {
			session = append(append([]byte(nil), prefix...), session...)
		}
		cli, sc := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(context.Background(), sc) }()
		go func() { _, _ = io.Copy(io.Discard, cli) }()
		go func() {
			_, _ = cli.Write(session)
			// Leave the server a moment to act on the input before the
			// client goes away.
			time.Sleep(time.Millisecond)
			cli.Close()
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("ServeConn hung on input % x", data)
		}
		if n := srv.Stats().ConnsActive; n != 0 {
			t.Fatalf("%d connections still active", n)
		}
	})
}
