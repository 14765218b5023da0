package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/tandem-storage/tandem/pkg/agentapi"
)

// The control API's types and client live in package agentapi, the
// contract between controller and agent. These test-only aliases keep the
// agent's tests (internal and external) reading as they did when they lived
// here; code outside the dataplane uses agentapi.
type (
	Client        = agentapi.Client
	APIError      = agentapi.APIError
	VolumeRequest = agentapi.VolumeRequest
	Checksums     = agentapi.Checksums
)

func NewClient(baseURL, token string) *Client { return agentapi.NewClient(baseURL, token) }

// rawCall sends one control API request as c would, for requests its
// methods do not make (default and malformed query parameters): a non-2xx
// answer is an *APIError with the ErrorBody's message.
func rawCall(ctx context.Context, c *Client, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e agentapi.ErrorBody
		if err := json.Unmarshal(data, &e); err != nil {
			return fmt.Errorf("%s %s: %d with a body that is not an ErrorBody: %q", method, path, resp.StatusCode, data)
		}
		return &APIError{Code: resp.StatusCode, Message: e.Error}
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}
