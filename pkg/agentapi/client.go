package agentapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sync/atomic"
	"time"
)

// API is the part of the control API the controller uses, so that its tests
// can give it a fake (package agentapitest) instead of agents.
type API interface {
	// Get returns a volume's status; IsNotFound(err) when the agent has no
	// replica of it.
	Get(ctx context.Context, ns, name string) (Status, error)
	// Put creates the replica if needed and applies the desired state.
	Put(ctx context.Context, ns, name string, req VolumeRequest) (Status, error)
	// Delete closes a replica; purge deletes its files.
	Delete(ctx context.Context, ns, name string, purge bool) error
	// PeerOutdated tells the writer the controller recorded member node
	// (none given: every member it mirrors to) Outdated at epoch. An error
	// wrapping ErrNotSent means the agent never received it.
	PeerOutdated(ctx context.Context, ns, name string, epoch uint64, node ...string) (Status, error)
}

// NewFunc returns the API of the agent whose control endpoint is endpoint
// ("http://host:port", or "https://host:port" for an agent with mutual
// TLS), authenticating with token. The controller takes one
// (NewAPI unless a test gives another).
type NewFunc func(endpoint, token string) API

// NewAPI is the NewFunc of real agents: a Client from NewClient.
func NewAPI(endpoint, token string) API { return NewClient(endpoint, token) }

var _ NewFunc = NewAPI

// NewTLSAPI returns the NewFunc of real agents for a caller with a TLS
// config (the manager's certificate, and the verification of the agents'
// certificates: package internal/tlsid): its clients share one transport
// that presents it, so connections to an agent are kept alive across
// calls. Plain "http://" endpoints are still reached without TLS.
func NewTLSAPI(cfg *tls.Config) NewFunc {
	tr := TLSTransport(cfg)
	return func(endpoint, token string) API {
		c := NewClient(endpoint, token)
		c.HTTP.Transport = tr
		return c
	}
}

// NewTLSAPIFor is NewTLSAPI with the TLS config chosen when a connection is
// dialed, from the agent's address (host:port): a caller that knows which
// node's agent serves at an address checks that its certificate names that
// node. Its clients share one transport as well.
func NewTLSAPIFor(cfgFor func(ctx context.Context, addr string) (*tls.Config, error)) NewFunc {
	tr := TLSTransport(nil)
	tr.DialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		cfg, err := cfgFor(ctx, addr)
		if err != nil {
			return nil, err
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		tc := tls.Client(c, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("TLS handshake with the agent at %s: %w", addr, err)
		}
		return tc, nil
	}
	return func(endpoint, token string) API {
		c := NewClient(endpoint, token)
		c.HTTP.Transport = tr
		return c
	}
}

// TLSTransport is an HTTP transport like http.DefaultTransport whose TLS
// connections use cfg.
func TLSTransport(cfg *tls.Config) *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = cfg
	// A custom TLS config disables HTTP/2 unless asked: the agents serve
	// HTTP/1.1 over TLS.
	tr.ForceAttemptHTTP2 = false
	return tr
}

// DefaultTimeout bounds a call of a client from NewClient: a probe must not
// wait for an agent that does not answer.
const DefaultTimeout = 5 * time.Second

// Client calls an agent's control API.
type Client struct {
	// BaseURL is "http://host:port" (or "https://host:port"; HTTP's
	// Transport then needs the TLS config: TLSTransport).
	BaseURL string
	Token   string
	HTTP    *http.Client
}

// NewClient returns a client with a short timeout (DefaultTimeout), as a
// probe needs.
func NewClient(baseURL, token string) *Client {
	return &Client{BaseURL: baseURL, Token: token, HTTP: &http.Client{Timeout: DefaultTimeout}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	var connected atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { connected.Store(true) }})
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		if !connected.Load() {
			return fmt.Errorf("%s %s: %w: %w", method, path, ErrNotSent, err)
		}
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var e ErrorBody
		_ = json.Unmarshal(data, &e)
		if e.Error == "" {
			e.Error = string(data)
		}
		return &APIError{Code: resp.StatusCode, Message: e.Error}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
		}
	}
	return nil
}

func volumePath(ns, name string) string { return "/v1/volumes/" + ns + "/" + name }

// Info returns the agent's node and endpoints.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var i Info
	return i, c.do(ctx, http.MethodGet, "/v1/info", nil, &i)
}

// Put creates the replica if needed and applies the desired state.
func (c *Client) Put(ctx context.Context, ns, name string, req VolumeRequest) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodPut, volumePath(ns, name), req, &s)
}

// Get returns a volume's status.
func (c *Client) Get(ctx context.Context, ns, name string) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodGet, volumePath(ns, name), nil, &s)
}

// List returns every volume's status.
func (c *Client) List(ctx context.Context) ([]Status, error) {
	var s []Status
	return s, c.do(ctx, http.MethodGet, "/v1/volumes", nil, &s)
}

// Delete closes a replica; purge deletes its files.
func (c *Client) Delete(ctx context.Context, ns, name string, purge bool) error {
	q := ""
	if purge {
		q = "?purge=true"
	}
	return c.do(ctx, http.MethodDelete, volumePath(ns, name)+q, nil, nil)
}

// PeerOutdated tells the agent the controller recorded member node (none
// given: every member it mirrors to) Outdated. An error wrapping
// ErrNotSent means the agent never received it.
func (c *Client) PeerOutdated(ctx context.Context, ns, name string, epoch uint64, node ...string) (Status, error) {
	var s Status
	req := PeerOutdatedRequest{Epoch: epoch}
	if len(node) > 0 {
		req.Node = node[0]
	}
	return s, c.do(ctx, http.MethodPost, volumePath(ns, name)+"/peer-outdated", req, &s)
}

// Bitmap returns a volume's dirty regions.
func (c *Client) Bitmap(ctx context.Context, ns, name string) (Bitmap, error) {
	var b Bitmap
	return b, c.do(ctx, http.MethodGet, volumePath(ns, name)+"/bitmap", nil, &b)
}

// Resync asks the writer's agent to copy regions to its peer again.
func (c *Client) Resync(ctx context.Context, ns, name string, first, count uint32) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodPost, volumePath(ns, name)+"/resync", ResyncRequest{First: first, Count: count}, &s)
}

// Checksums returns the SHA-256 of count regions of a volume's local replica,
// starting at region first (count ≤ MaxChecksumRegions).
func (c *Client) Checksums(ctx context.Context, ns, name string, first, count uint32) (Checksums, error) {
	var s Checksums
	path := fmt.Sprintf("%s/checksums?first=%d&count=%d", volumePath(ns, name), first, count)
	if err := c.do(ctx, http.MethodGet, path, nil, &s); err != nil {
		return s, err
	}
	if s.Algorithm != "" && s.Algorithm != ChecksumAlgorithm {
		return s, fmt.Errorf("checksums of %s/%s: agent uses %q, want %q", ns, name, s.Algorithm, ChecksumAlgorithm)
	}
	if len(s.Sums) != int(count) || s.First != first {
		return s, fmt.Errorf("checksums of %s/%s: asked for regions [%d, +%d), got [%d, +%d)", ns, name, first, count, s.First, len(s.Sums))
	}
	return s, nil
}

var _ API = (*Client)(nil)
