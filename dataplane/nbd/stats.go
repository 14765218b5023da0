package nbd

import "sync/atomic"

// CommandStats counts one command type's requests since the server started.
// Bytes counts the lengths of successful requests (data moved for READ and
// WRITE, range covered for TRIM and WRITE_ZEROES).
type CommandStats struct {
	Requests uint64
	Bytes    uint64
	Errors   uint64
}

// Stats is a snapshot of a Server's counters. All counters are monotonic
// except ConnsActive, so they map directly onto Prometheus counters/gauges.
type Stats struct {
	Read, Write, Flush, Trim, WriteZeroes, Disc CommandStats
	// Other counts unknown commands (all answered with EINVAL).
	Other CommandStats
	// ConnsActive is the number of connections being served now.
	ConnsActive int64
	// ConnsTotal counts every connection served.
	ConnsTotal uint64
	// Refused counts export lookups refused during negotiation.
	Refused uint64
	// ProtocolErrors counts connections closed for a protocol violation.
	ProtocolErrors uint64
	// TLSConns counts connections that negotiated TLS (NBD_OPT_STARTTLS),
	// TLSFailures the TLS handshakes that failed (a client certificate
	// refused, no certificate, another CA...).
	TLSConns, TLSFailures uint64
}

type commandCounters struct {
	requests, bytes, errors atomic.Uint64
}

func (c *commandCounters) snapshot() CommandStats {
	return CommandStats{Requests: c.requests.Load(), Bytes: c.bytes.Load(), Errors: c.errors.Load()}
}

type serverStats struct {
	read, write, flush, trim, writeZeroes, disc, other commandCounters

	connsActive    atomic.Int64
	connsTotal     atomic.Uint64
	refused        atomic.Uint64
	protocolErrors atomic.Uint64
	tlsConns       atomic.Uint64
	tlsFailures    atomic.Uint64
}

func (s *serverStats) cmd(t uint16) *commandCounters {
	switch t {
	case CmdRead:
		return &s.read
	case CmdWrite:
		return &s.write
	case CmdFlush:
		return &s.flush
	case CmdTrim:
		return &s.trim
	case CmdWriteZeroes:
		return &s.writeZeroes
	case CmdDisc:
		return &s.disc
	default:
		return &s.other
	}
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() Stats {
	st := &s.stats
	return Stats{
		Read:           st.read.snapshot(),
		Write:          st.write.snapshot(),
		Flush:          st.flush.snapshot(),
		Trim:           st.trim.snapshot(),
		WriteZeroes:    st.writeZeroes.snapshot(),
		Disc:           st.disc.snapshot(),
		Other:          st.other.snapshot(),
		ConnsActive:    st.connsActive.Load(),
		ConnsTotal:     st.connsTotal.Load(),
		Refused:        st.refused.Load(),
		ProtocolErrors: st.protocolErrors.Load(),
		TLSConns:       st.tlsConns.Load(),
		TLSFailures:    st.tlsFailures.Load(),
	}
}
