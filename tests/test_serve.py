"""`python infer.py --serve`: OpenAI's own client gets what infer.generate gives, streamed or not;
bad requests get OpenAI's error shape and leave the server answering; the chat page streams the
same answer in a real browser (skipped without chromium, chromedriver and selenium)."""
import http.client
import json
import shutil
import threading

import pytest
import torch

import infer
from model import ModelConfig, Transformer
from prep.tokenizer import chat_text


@pytest.fixture(scope="module")
def server(tokens_dir):
    """(url, model, tokenizer, args) of a server on a free port, in a thread."""
    from tokenizers import Tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=128)).eval()
    tok = Tokenizer.from_file(str(tokens_dir.parent / "tokenizer.json"))
    args = infer.parse_args(["--serve", "--checkpoint", "runs/tiny/", "--port", "0", "--max-new-tokens", "12"])
    srv = infer.make_server(model, tok, args)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", model, tok, args
    srv.shutdown()
    srv.server_close()


def reference(server, text, max_tokens, stop=()):
    """(text, finish reason, prompt tokens, completion tokens) that infer.generate gives, greedy."""
    _, model, tok, _ = server
    prompt = infer.encode(tok, text)
    out = infer.generate(model, [prompt], max_tokens, 0.0, stop_ids=infer.stop_ids(tok), stop_strings=list(stop),
                         decode=tok.decode)[0]
    full = tok.decode(out)
    cut = infer.cut_at_stop(full, stop)
    return cut, "stop" if out[-1] in infer.stop_ids(tok) or cut != full else "length", len(prompt), len(out)


def client(server):
    import openai
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_lists_the_one_model(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_match_generate(server, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]
    text, finish, n_prompt, n_out = reference(server, chat_text(messages), 20)
    r = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                               stream=stream)
    if stream:
        chunks = list(r)
        assert {c.object for c in chunks} == {"chat.completion.chunk"} and len(chunks) > 3  # piece by piece
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
        assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, finish]
    else:
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, finish)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (n_prompt, n_out, n_prompt + n_out)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_generate_and_cut_at_stop_strings(server, stream):
    prompt = "import json\n\n"
    full = reference(server, prompt, 24)[0]
    # One stop string that occurs (the text is cut before it); one that never does but whose first
    # character does: the stream holds that character back and then lets it go.
    stop = [full[8:11], full[3] + "\x00"]
    assert full[8:11] and full[3] in full[:8]
    for stops in ([], stop):
        text, finish, n_prompt, n_out = reference(server, prompt, 24, stops)
        r = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stops,
                                              stream=stream)
        if stream:
            chunks = list(r)
            assert {c.object for c in chunks} == {"text_completion"}
            assert ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason) == (text, finish)
        else:
            assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_out)
    assert finish == "stop" and len(text) <= 8


def test_the_model_name_may_be_left_out_and_defaults_come_from_the_command_line(server):
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x = ", "temperature": 0})
    assert status == 200 and body["model"] == "tiny" and body["usage"]["completion_tokens"] == 12  # --max-new-tokens
    assert body["choices"][0]["text"] == reference(server, "x = ", 12)[0]


def request(server, method, path, body=None):
    host, port = server[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode(),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("path, body, status, param, code", [
    (CHAT, b"{'messages': oops", 400, None, None),
    (CHAT, b"", 400, None, None),
    (CHAT, [HELLO], 400, None, None),
    (CHAT, {"model": "tiny"}, 400, "messages", "invalid_value"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", None),
    (CHAT, {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"messages": HELLO, "max_tokens": "10"}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"messages": HELLO, "max_tokens": True}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"messages": HELLO, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    (CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p", "invalid_value"),
    (CHAT, {"messages": HELLO, "stop": ["ok", ""]}, 400, "stop", "invalid_value"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream", "invalid_value"),
    (CHAT, {"messages": HELLO, "max_tokens": 200}, 400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x" * 400, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    (CHAT, {"messages": HELLO, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/embeddings", {"input": "hi"}, 404, None, "not_found"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, path, body, status, param, code):
    got, answer = request(server, "POST", path, body)
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert (answer["error"]["type"], answer["error"]["param"], answer["error"]["code"]) == \
        ("invalid_request_error", param, code)
    assert param is None or answer["error"]["message"].startswith(param)
    assert request(server, "POST", CHAT, {"messages": HELLO, "max_tokens": 2})[0] == 200


def test_a_wrong_method_is_a_404_and_the_page_is_served(server):
    for method, path in (("GET", CHAT), ("DELETE", "/v1/models")):
        status, answer = request(server, method, path)
        assert status == 404 and f"no route {method} {path}" in answer["error"]["message"]
    conn = http.client.HTTPConnection(server[0].removeprefix("http://"), timeout=60)
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/html")
    assert b"/v1/chat/completions" in r.read()


def test_an_unexpected_exception_is_a_500_with_a_json_body(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the accelerator caught fire")
    monkeypatch.setattr(infer, "complete", broken)
    status, answer = request(server, "POST", CHAT, {"messages": HELLO})
    assert status == 500 and answer["error"]["type"] == "server_error" and "caught fire" in answer["error"]["message"]
    monkeypatch.undo()
    assert request(server, "POST", CHAT, {"messages": HELLO, "max_tokens": 2})[0] == 200


def test_concurrent_clients_each_get_their_own_answer(server):
    prompts = ["class Parser:\n", "for line in lines:\n", "return ", "def "]
    want = [reference(server, p, 16)[0] for p in prompts]
    got = [None] * len(prompts)

    def ask(i):  # half streamed, half not
        r = client(server).completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0,
                                              stream=i % 2 == 1)
        got[i] = "".join(c.choices[0].text for c in r) if i % 2 else r.choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_the_chat_page_streams_a_multi_turn_conversation(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = browser()
    try:
        driver.get(server[0] + "/")
        for field, value in (("temperature", "0"), ("max_tokens", "16"), ("system", "Answer in code.")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        # Count the page's updates of the answer: more than one means it arrived piece by piece.
        driver.execute_script("window.updates = 0; new MutationObserver(() => window.updates++).observe("
                              "document.getElementById('log'), {childList: true, subtree: true, characterData: true})")

        def say(text):
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) ==
                                            len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")))
            last = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
            assert "error" not in last.get_attribute("class")
            return last.get_attribute("textContent")

        messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "hello"}]
        first = say("hello")
        assert first and first == reference(server, chat_text(messages), 16)[0]
        assert driver.execute_script("return window.updates") > 3
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
        assert say("and then?") == reference(server, chat_text(messages), 16)[0]
        driver.find_element(By.ID, "reset").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
        assert say("hello") == first  # a new conversation: the history is gone
    finally:
        driver.quit()
