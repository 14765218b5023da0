package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"sync/atomic"
	"time"

	"github.com/tandem-storage/tandem/dataplane/volume"
)

// Client calls an agent's control API. The controller and tests use it.
type Client struct {
	// BaseURL is "http://host:port".
	BaseURL string
	Token   string
	HTTP    *http.Client
}

// NewClient returns a client with a short timeout, as a probe needs.
func NewClient(baseURL, token string) *Client {
	return &Client{BaseURL: baseURL, Token: token, HTTP: &http.Client{Timeout: 5 * time.Second}}
}

// APIError is a non-2xx answer.
type APIError struct {
	Code    int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("agent answered %d: %s", e.Code, e.Message) }

// ErrNotSent is wrapped by the error of a call that never reached the
// agent: no connection to it was made (the dial failed or timed out, or the
// context ended first), so the agent did not act on it. A call that failed
// in any other way (after connecting: a write error, a timeout, a lost
// answer) may have taken effect. This relies on the transport reporting
// connections through net/http/httptrace, as net/http's does.
var ErrNotSent = errors.New("request not sent: no connection to the agent was made")

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
		var e struct {
			Error string `json:"error"`
		}
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

// Info returns the agent's node and endpoints.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var i Info
	return i, c.do(ctx, http.MethodGet, "/v1/info", nil, &i)
}

// Put creates the replica if needed and applies the desired state.
func (c *Client) Put(ctx context.Context, ns, name string, req VolumeRequest) (volume.Status, error) {
	var s volume.Status
	return s, c.do(ctx, http.MethodPut, "/v1/volumes/"+ns+"/"+name, req, &s)
}

// Get returns a volume's status.
func (c *Client) Get(ctx context.Context, ns, name string) (volume.Status, error) {
	var s volume.Status
	return s, c.do(ctx, http.MethodGet, "/v1/volumes/"+ns+"/"+name, nil, &s)
}

// List returns every volume's status.
func (c *Client) List(ctx context.Context) ([]volume.Status, error) {
	var s []volume.Status
	return s, c.do(ctx, http.MethodGet, "/v1/volumes", nil, &s)
}

// Delete closes a replica; purge deletes its files.
func (c *Client) Delete(ctx context.Context, ns, name string, purge bool) error {
	q := ""
	if purge {
		q = "?purge=true"
	}
	return c.do(ctx, http.MethodDelete, "/v1/volumes/"+ns+"/"+name+q, nil, nil)
}

// PeerOutdated tells the agent the controller recorded its peer Outdated.
// An error wrapping ErrNotSent means the agent never received it.
func (c *Client) PeerOutdated(ctx context.Context, ns, name string, epoch uint64) (volume.Status, error) {
	var s volume.Status
	return s, c.do(ctx, http.MethodPost, "/v1/volumes/"+ns+"/"+name+"/peer-outdated", PeerOutdatedRequest{Epoch: epoch}, &s)
}

// Bitmap returns a volume's dirty regions.
func (c *Client) Bitmap(ctx context.Context, ns, name string) (Bitmap, error) {
	var b Bitmap
	return b, c.do(ctx, http.MethodGet, "/v1/volumes/"+ns+"/"+name+"/bitmap", nil, &b)
}
