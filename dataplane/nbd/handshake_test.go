package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestGreetingFlags(t *testing.T) {
	env := startServer(t, 1<<20, nil)
	c := dial(t, env.addr)
	if got, want := c.greeting(), flagFixedNewstyle|flagNoZeroes; got != want {
		t.Fatalf("handshake flags 0x%x, want 0x%x", got, want)
	}
}

func TestHandshakeVariants(t *testing.T) {
	const size = 1 << 20
	tests := []struct {
		name  string
		tweak func(*Server, *StaticExports)
		run   func(t *testing.T, env *testEnv, c *testClient)
	}{
		{
			name: "EXPORT_NAME with zeroes",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				c.option(optExportName, []byte(testExport))
				b, err := c.readFull(10 + 124)
				if err != nil {
					t.Fatal(err)
				}
				if binary.BigEndian.Uint64(b) != size {
					t.Fatalf("size %d", binary.BigEndian.Uint64(b))
				}
				if !bytes.Equal(b[10:], make([]byte, 124)) {
					t.Fatalf("reserved bytes not zero")
				}
				assertTransmission(t, c)
			},
		},
		{
			name: "EXPORT_NAME with NO_ZEROES",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				c.option(optExportName, []byte(testExport))
				b, err := c.readFull(10)
				if err != nil {
					t.Fatal(err)
				}
				want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn
				if f := binary.BigEndian.Uint16(b[8:]); f != want {
					t.Fatalf("transmission flags 0x%x, want 0x%x", f, want)
				}
				assertTransmission(t, c) // would misparse if 124 zeroes had been sent
			},
		},
		{
			name: "non-fixed client is served",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(0)
				c.option(optExportName, []byte(testExport))
				if _, err := c.readFull(10 + 124); err != nil {
					t.Fatal(err)
				}
				assertTransmission(t, c)
			},
		},
		{
			name: "unknown client flag closes",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | 1<<7)
				if rest := c.expectClosed(); len(rest) != 0 {
					t.Fatalf("got %d bytes before close", len(rest))
				}
				env.logs.waitFor(t, "unknown client flags 0x00000081")
			},
		},
		{
			name: "GO with all infos",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				infos, final := c.infoReplies(optGo, testExport, infoName, infoDescription, infoBlockSize, 99)
				if final.typ != repAck {
					t.Fatalf("final reply 0x%x", final.typ)
				}
				if string(infos[infoName]) != testExport || string(infos[infoDescription]) != "test volume" {
					t.Fatalf("name %q description %q", infos[infoName], infos[infoDescription])
				}
				bs := infos[infoBlockSize]
				if len(bs) != 12 || binary.BigEndian.Uint32(bs[0:]) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
					t.Fatalf("block sizes % x", bs)
				}
				if _, ok := infos[99]; ok {
					t.Fatalf("unknown info type answered")
				}
				assertTransmission(t, c)
			},
		},
		{
			name:  "block sizes capped by MaxPayload",
			tweak: func(s *Server, _ *StaticExports) { s.MaxPayload = 1 << 20 },
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				infos, _ := c.infoReplies(optInfo, testExport)
				bs := infos[infoBlockSize]
				if len(bs) != 12 || binary.BigEndian.Uint32(bs[8:]) != 1<<20 {
					t.Fatalf("block sizes % x", bs)
				}
			},
		},
		{
			name: "INFO then GO",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				infos, final := c.infoReplies(optInfo, testExport)
				if final.typ != repAck || len(infos[infoExport]) != 10 {
					t.Fatalf("INFO: final 0x%x infos %v", final.typ, infos)
				}
				if _, ok := infos[infoName]; ok {
					t.Fatalf("NBD_INFO_NAME sent unasked")
				}
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name: "unsupported options",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				for _, opt := range []uint32{optStructuredReply, optStartTLS, optListMetaContext, optSetMetaContext, optExtendedHeaders, 4, 1000} {
					c.option(opt, nil)
					r := c.mustOptReply()
					if r.opt != opt || r.typ != repErrUnsup {
						t.Fatalf("%s: reply opt %d type 0x%x", optionName(opt), r.opt, r.typ)
					}
				}
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name: "malformed GO then GO",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				bad := [][]byte{
					{0, 0},
					{0, 0, 0, 9, 'a', 0, 0},                // name longer than data
					append(encodeInfoRequest("x"), 0),      // trailing byte
					encodeInfoRequest("x", 1, 2)[:4+1+2+2], // count says 2, one present
				}
				for _, b := range bad {
					c.option(optGo, b)
					if r := c.mustOptReply(); r.typ != repErrInvalid {
						t.Fatalf("malformed GO % x: reply 0x%x", b, r.typ)
					}
				}
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name: "LIST",
			tweak: func(_ *Server, e *StaticExports) {
				e.Add("ns/other", &Export{Backend: NewMemBackend(4096)})
			},
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				c.option(optList, nil)
				var names []string
				for {
					r := c.mustOptReply()
					if r.typ == repAck {
						break
					}
					if r.typ != repServer || binary.BigEndian.Uint32(r.data) != uint32(len(r.data)-4) {
						t.Fatalf("LIST reply 0x%x % x", r.typ, r.data)
					}
					names = append(names, string(r.data[4:]))
				}
				if strings.Join(names, ",") != "ns/other,ns/vol" {
					t.Fatalf("LIST names %q", names)
				}
				c.option(optList, []byte{1})
				if r := c.mustOptReply(); r.typ != repErrInvalid {
					t.Fatalf("LIST with data: reply 0x%x", r.typ)
				}
			},
		},
		{
			name: "ABORT",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				c.option(optAbort, nil)
				if r := c.mustOptReply(); r.typ != repAck || r.opt != optAbort {
					t.Fatalf("ABORT reply %+v", r)
				}
				c.expectClosed()
			},
		},
		{
			name: "oversized option is skipped",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle | clientNoZeroes)
				c.option(1000, make([]byte, maxOptionLen+1))
				if r := c.mustOptReply(); r.typ != repErrTooBig {
					t.Fatalf("reply 0x%x", r.typ)
				}
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name: "huge option closes",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				c.write(encodeOption(optGo, nil)[:12])
				c.write(binary.BigEndian.AppendUint32(nil, 1<<30))
				c.expectClosed()
				env.logs.waitFor(t, "exceeds 65536")
			},
		},
		{
			name: "bad option magic closes",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				c.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
				c.expectClosed()
				env.logs.waitFor(t, "bad option magic")
				if env.srv.Stats().ProtocolErrors != 1 {
					t.Fatalf("stats %+v", env.srv.Stats())
				}
			},
		},
		{
			name: "empty name without default",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				_, final := c.infoReplies(optGo, "")
				if final.typ != repErrUnknown || !strings.Contains(string(final.data), "no default export") {
					t.Fatalf("reply 0x%x %q", final.typ, final.data)
				}
			},
		},
		{
			name:  "empty name with default",
			tweak: func(_ *Server, e *StaticExports) { e.SetDefault(testExport) },
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				infos, final := c.infoReplies(optGo, "", infoName)
				if final.typ != repAck || string(infos[infoName]) != testExport {
					t.Fatalf("reply 0x%x name %q", final.typ, infos[infoName])
				}
				assertTransmission(t, c)
			},
		},
		{
			name: "unknown export",
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				_, final := c.infoReplies(optGo, "ns/missing")
				if final.typ != repErrUnknown || string(final.data) != `unknown export "ns/missing"` {
					t.Fatalf("reply 0x%x %q", final.typ, final.data)
				}
				// The session goes on: the client may pick another export.
				c.goExport(testExport)
				assertTransmission(t, c)
			},
		},
		{
			name: "misconfigured export refused",
			tweak: func(_ *Server, e *StaticExports) {
				e.Add("ns/bad", &Export{Backend: NewMemBackend(4096), MinBlock: 3})
			},
			run: func(t *testing.T, env *testEnv, c *testClient) {
				c.clientFlags(clientFixedNewstyle)
				_, final := c.infoReplies(optGo, "ns/bad")
				if final.typ != repErrUnknown || !strings.Contains(string(final.data), "minimum block size 3") {
					t.Fatalf("reply 0x%x %q", final.typ, final.data)
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := startServer(t, size, tc.tweak)
			c := dial(t, env.addr)
			c.greeting()
			tc.run(t, env, c)
		})
	}
}

// assertTransmission checks that c is in the transmission phase: a write and
// a read round-trip.
func assertTransmission(t *testing.T, c *testClient) {
	t.Helper()
	c.readLens = map[uint64]uint32{}
	p := pattern(512, 3)
	if e := c.writeAt(4096, p, 0); e != 0 {
		t.Fatalf("write errno %d", e)
	}
	got, e := c.readAt(4096, 512)
	if e != 0 {
		t.Fatalf("read errno %d", e)
	}
	assertBytes(t, "read back", got, p)
}

func TestLookupRefusalReachesClient(t *testing.T) {
	const reason = "member node-b is the backup, not the writer (epoch 3)"
	env := startServer(t, 1<<20, func(_ *Server, e *StaticExports) {
		e.Refuse("ns/pair", errors.New(reason))
		e.Refuse("ns/policy", fmt.Errorf("%w: tenant quota", ErrPolicy))
		e.Refuse("ns/closing", fmt.Errorf("agent draining: %w", ErrShuttingDown))
	})
	for _, tc := range []struct {
		export string
		opt    uint32
		typ    uint32
		text   string
	}{
		{"ns/pair", optGo, repErrUnknown, reason},
		{"ns/pair", optInfo, repErrUnknown, reason},
		{"ns/policy", optGo, repErrPolicy, "refused by policy: tenant quota"},
		{"ns/closing", optGo, repErrShutdown, "agent draining: server is shutting down"},
	} {
		c := dial(t, env.addr)
		c.greeting()
		c.clientFlags(clientFixedNewstyle)
		_, final := c.infoReplies(tc.opt, tc.export)
		if final.typ != tc.typ || string(final.data) != tc.text {
			t.Errorf("%s %s: reply 0x%x %q, want 0x%x %q", optionName(tc.opt), tc.export, final.typ, final.data, tc.typ, tc.text)
		}
	}
	env.logs.waitFor(t, reason)

	// NBD_OPT_EXPORT_NAME cannot carry the error: the connection closes and
	// the reason is logged.
	c := dial(t, env.addr)
	c.greeting()
	c.clientFlags(clientFixedNewstyle)
	c.option(optExportName, []byte("ns/pair"))
	if rest := c.expectClosed(); len(rest) != 0 {
		t.Fatalf("got % x before close", rest)
	}
	env.logs.waitFor(t, `refusing export \"ns/pair\" requested by NBD_OPT_EXPORT_NAME: `+reason)
	if got := env.srv.Stats().Refused; got != 5 {
		t.Fatalf("Refused = %d, want 5", got)
	}
}

func TestHandshakeTimeout(t *testing.T) {
	env := startServer(t, 1<<20, func(s *Server, _ *StaticExports) { s.HandshakeTimeout = 300 * time.Millisecond })
	t.Run("idle", func(t *testing.T) {
		c := dial(t, env.addr)
		start := time.Now()
		c.greeting()
		c.expectClosed()
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("idle client dropped after %v", d)
		}
	})
	t.Run("slow trickle", func(t *testing.T) {
		c := dial(t, env.addr)
		start := time.Now()
		c.greeting()
		c.clientFlags(clientFixedNewstyle)
		// Each option is answered quickly, but the whole negotiation is
		// bounded.
		for time.Since(start) < testTimeout {
			if _, err := c.c.Write(encodeOption(1000, nil)); err != nil {
				break
			}
			if _, err := c.optReply(); err != nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("slow client dropped after %v", d)
		}
	})
	env.logs.waitFor(t, "i/o timeout")
	// After the handshake there is no idle timeout.
	c := connect(t, env.addr, testExport)
	time.Sleep(500 * time.Millisecond)
	assertTransmission(t, c)
}
