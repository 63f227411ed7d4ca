// tracestar serve: the page's only script. Text from the server is set with textContent; the
// hit lists arrive as HTML that the server rendered and escaped with the report's code, and are
// the only innerHTML. The Content-Security-Policy runs no script but this file.
(function () {
  'use strict';
  var $ = function (id) { return document.getElementById(id); };
  var state = { traceId: null, busy: false, tokenSeq: 0 };

  function setStatus(text, isError) {
    $('status').textContent = text;
    $('status').classList.toggle('error', !!isError);
  }

  function fact(name, value) {
    var el = document.querySelector('[data-fact="' + name + '"]');
    if (el) { el.textContent = value; }
  }

  function num(x, digits) {
    if (x === null || x === undefined) { return '–'; }
    return typeof x === 'number' ? x.toFixed(digits) : String(x);
  }

  function loadInfo() {
    fetch('/api/info').then(function (r) { return r.json(); }).then(function (info) {
      fact('model', info.model);
      fact('n_params', info.n_params === null || info.n_params === undefined ? '–' : info.n_params.toLocaleString('en-US'));
      fact('coverage', info.coverage === null || info.coverage === undefined ? '–' : (100 * info.coverage).toFixed(1) + '% of parameters');
      fact('dim', info.dim.toLocaleString('en-US'));
      fact('v_source', info.v_source);
      fact('preconditioner', info.preconditioner + (info.unit_norm ? ', unit norm' : ''));
      fact('lambda', info.lambda === null || info.lambda === undefined ? '–' : num(info.lambda, 4) + (info.lambda_source ? ' (' + info.lambda_source + ')' : ''));
      fact('n_docs', info.n_docs.toLocaleString('en-US'));
      fact('corpus', info.corpus);
      fact('max_length', info.max_length + ' tokens');
      fact('fingerprint', info.fingerprint);
      var box = $('max-new');
      box.max = info.max_new_tokens;
      if (+box.value > info.max_new_tokens) { box.value = info.max_new_tokens; }
    }).catch(function () { setStatus('could not read the index facts', true); });
  }

  // Server-sent events from a fetch() body (EventSource cannot POST).
  function readEvents(response, onEvent) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = '';
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) { return; }
        buffer += decoder.decode(chunk.value, { stream: true });
        var cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          var block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          var kind = 'message', data = '';
          block.split('\n').forEach(function (line) {
            if (line.indexOf('event: ') === 0) { kind = line.slice(7); }
            else if (line.indexOf('data: ') === 0) { data += line.slice(6); }
          });
          onEvent(kind, JSON.parse(data));
        }
        return pump();
      });
    }
    return pump();
  }

  function errorOf(response) {
    return response.json().then(function (body) { return body.error || response.statusText; },
                                function () { return response.status + ' ' + response.statusText; });
  }

  function addToken(t) {
    var b = document.createElement('button');
    b.type = 'button';
    b.className = 'tok';
    b.disabled = true;
    b.textContent = t.token;
    b.setAttribute('data-position', String(t.position));
    b.title = 'token ' + t.position + ': click for its own proponents';
    $('generation').appendChild(b);
  }

  function tokenButtons() {
    return Array.prototype.slice.call(document.querySelectorAll('#generation button.tok'));
  }

  function showResult(result) {
    state.traceId = result.trace_id;
    if (tokenButtons().length === 0) {  // the JSON carries the tokens too
      result.generation.tokens.forEach(addToken);
    }
    $('proponents').innerHTML = result.html.proponents;  // rendered and escaped by the server
    $('opponents').innerHTML = result.html.opponents;
    $('bm25').innerHTML = result.html.bm25;
    tokenButtons().forEach(function (b) { b.disabled = false; });
    var g = result.generation;
    var how = g.source === 'target' ? 'the given target' : (g.stopped === 'eos' ? 'greedy, ended by the model' : 'greedy, cut at max new tokens');
    var t = result.timings || {};
    var total = ['generate_s', 'attribute_s', 'explain_s', 'bm25_s'].reduce(function (s, k) { return s + (t[k] || 0); }, 0);
    setStatus(g.tokens.length + ' tokens (' + how + '); traced in ' + total.toFixed(2) + ' s — generation ' +
              num(t.generate_s, 2) + ' s, attribution ' + num(t.attribute_s, 2) + ' s, heat maps ' + num(t.explain_s, 2) + ' s');
    document.body.setAttribute('data-trace', result.trace_id);
  }

  function ask(event) {
    event.preventDefault();
    if (state.busy) { return; }
    var body = { prompt: $('prompt').value, max_new_tokens: parseInt($('max-new').value, 10) };
    var target = $('target').value;
    if (target) { body.target = target; }
    state.busy = true;
    state.traceId = null;
    $('go').disabled = true;
    $('out').hidden = false;
    $('token-out').hidden = true;
    $('shown-prompt').textContent = body.prompt;
    $('generation').textContent = '';
    ['proponents', 'opponents', 'bm25'].forEach(function (id) { $(id).textContent = ''; });
    document.body.removeAttribute('data-trace');
    setStatus(target ? 'tracing the target…' : 'generating…');
    fetch('/api/trace/stream', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) })
      .then(function (response) {
        if (!response.ok) { return errorOf(response).then(function (msg) { setStatus(msg, true); }); }
        return readEvents(response, function (kind, data) {
          if (kind === 'token') {
            addToken(data);
            setStatus('generating… ' + (data.position + 1) + ' tokens');
          } else if (kind === 'result') {
            showResult(data);
          } else if (kind === 'error') {
            setStatus(data.error, true);
          }
        });
      })
      .catch(function (err) { setStatus('request failed: ' + err, true); })
      .then(function () { state.busy = false; $('go').disabled = false; });
  }

  function clickToken(event) {
    var b = event.target.closest('button.tok');
    if (!b || !state.traceId || b.disabled) { return; }
    var position = parseInt(b.getAttribute('data-position'), 10);
    var seq = ++state.tokenSeq;
    tokenButtons().forEach(function (o) { o.classList.toggle('sel', o === b); });
    var out = $('token-out');
    out.hidden = false;
    out.removeAttribute('data-position');
    $('token-label').textContent = position + ': “' + b.textContent + '”';
    $('token-prefix').textContent = '';
    $('token-target').textContent = '';
    $('token-proponents').textContent = 'tracing this token…';
    $('token-opponents').textContent = '';
    fetch('/api/token', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                          body: JSON.stringify({ trace_id: state.traceId, position: position }) })
      .then(function (response) {
        if (!response.ok) { return errorOf(response).then(function (msg) { $('token-proponents').textContent = msg; }); }
        return response.json().then(function (result) {
          if (seq !== state.tokenSeq) { return; }  // another token was clicked since
          $('token-prefix').textContent = result.prompt;
          $('token-target').textContent = result.target;
          $('token-proponents').innerHTML = result.html.proponents;  // rendered and escaped by the server
          $('token-opponents').innerHTML = result.html.opponents;
          out.setAttribute('data-position', String(position));
        });
      })
      .catch(function (err) { $('token-proponents').textContent = 'request failed: ' + err; });
  }

  $('ask').addEventListener('submit', ask);
  $('generation').addEventListener('click', clickToken);
  $('prompt').addEventListener('keydown', function (e) {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { ask(e); }
  });
  loadInfo();
})();
