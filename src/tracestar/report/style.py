"""The report's look and its one script: the style sheet, the search-and-navigation script, and
the Content-Security-Policy that allows exactly that script (by its hash) and nothing from the network.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
*{box-sizing:border-box}
html,body{margin:0;height:100%}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;background:#f4f5f8;display:flex}
#side{width:300px;min-width:220px;height:100vh;display:flex;flex-direction:column;background:#fff;border-right:1px solid #d9dce3}
#side header{padding:12px 12px 8px;border-bottom:1px solid #e4e6eb}
#side h1{font-size:15px;margin:0 0 8px}
#search{width:100%;padding:6px 8px;font:inherit;border:1px solid #b9bfcc;border-radius:6px}
#count{font-size:12px;color:#667;margin-top:4px}
#qlist{list-style:none;margin:0;padding:0;overflow-y:auto;flex:1}
#qlist li a{display:block;padding:6px 12px;color:inherit;text-decoration:none;border-bottom:1px solid #f0f1f4}
#qlist li a:hover,#qlist li.cur a{background:#e9effd}
#qlist .qid{display:block;font-weight:600;font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#qlist .qlabel{display:block;font-size:12px;color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
main{flex:1;height:100vh;overflow-y:auto;padding:16px 24px 64px}
.query{background:#fff;border:1px solid #d9dce3;border-radius:8px;padding:12px 16px;margin:0 0 16px;content-visibility:auto;contain-intrinsic-size:auto 500px}
.query h2{font-size:16px;margin:0 0 4px}
.qtext{margin:0 0 8px;font-size:15px;white-space:pre-wrap;overflow-wrap:anywhere}
.qtext .prompt{color:#333}
.qtext .target{background:#fff1b8;border-bottom:2px solid #e0b400;margin-left:4px;font-weight:600}
.cols{display:grid;grid-template-columns:minmax(0,1fr);gap:16px}
.cols.two{grid-template-columns:minmax(0,2fr) minmax(0,1fr)}
.cols.two .col+.col .docid{width:9em}
.span{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;color:#666;flex:none;margin-right:.5em}
.col h3{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#556;margin:8px 0 4px}
ol.hits{list-style:none;margin:0;padding:0}
.hit{border-top:1px solid #eef0f3}
.hit summary{display:flex;align-items:center;gap:8px;padding:4px 2px;cursor:pointer}
.rank{width:22px;text-align:right;color:#889;font-size:12px;flex:none}
.docid{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;width:13em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;flex:none}
.bar{flex:1;min-width:60px;height:10px;background:#eef0f3;border-radius:5px;overflow:hidden}
.fill{display:block;height:100%}
.fill.pos{background:#2e8b57}.fill.neg{background:#c0392b}
.score{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;width:5.5em;text-align:right;flex:none}
.tsum{font-size:11px;color:#778;flex:none;width:8.5em;white-space:nowrap}
ol.bm25 .tsum{display:none}
.mark{flex:none;width:3em}
.badge{font-size:10px;background:#e3e8f7;color:#345;border-radius:8px;padding:0 6px}
.doc{margin:2px 0 8px 30px;padding:8px 10px;background:#fafbfc;border:1px solid #eceef2;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:13.5px;max-height:22em;overflow-y:auto}
.heat{border-radius:2px}
.heat.z{background:transparent}
.p1{background:rgba(46,160,90,.10)}.p2{background:rgba(46,160,90,.18)}.p3{background:rgba(46,160,90,.27)}.p4{background:rgba(46,160,90,.36)}
.p5{background:rgba(46,160,90,.46)}.p6{background:rgba(46,160,90,.56)}.p7{background:rgba(46,160,90,.68)}.p8{background:rgba(46,160,90,.80)}
.n1{background:rgba(214,60,50,.10)}.n2{background:rgba(214,60,50,.18)}.n3{background:rgba(214,60,50,.27)}.n4{background:rgba(214,60,50,.36)}
.n5{background:rgba(214,60,50,.46)}.n6{background:rgba(214,60,50,.56)}.n7{background:rgba(214,60,50,.68)}.n8{background:rgba(214,60,50,.80)}
.heat:hover{outline:1px solid #333}
.trunc,.missing,.empty{color:#889;font-style:italic}
details.opps>summary{cursor:pointer;margin-top:8px;font-size:13px;color:#556;font-weight:600}
.legend{font-size:12px;color:#556;margin:0 0 12px}
.legend .heat{padding:0 4px}
table.md{border-collapse:collapse;margin:8px 0;font-size:13px}
table.md th,table.md td{border:1px solid #d9dce3;padding:3px 8px;text-align:left}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #e4e6eb}figcaption{font-size:12px;color:#667}
pre{background:#fafbfc;padding:8px;overflow-x:auto}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;background:#f0f2f5;padding:0 3px;border-radius:3px}
table.md td.num,table.md th.num{text-align:right}
.evaluation ul{margin:4px 0 8px;padding-left:20px}.evaluation h3{font-size:14px;margin:14px 0 4px}
.accuracy{margin:4px 0}
.warn{background:#fff4e5;border:1px solid #f0b46a;border-radius:6px;padding:6px 10px;margin:6px 0;color:#6b3d00}
.hidden{display:none!important}
@media (max-width:900px){.cols.two{grid-template-columns:minmax(0,1fr)}#side{width:220px}}
"""

SCRIPT = """
(function(){
  var input=document.getElementById('search');
  var items=Array.prototype.slice.call(document.querySelectorAll('#qlist li[data-qi]'));
  var sections={};
  Array.prototype.forEach.call(document.querySelectorAll('section.query[data-qi]'),function(s){sections[s.getAttribute('data-qi')]=s;});
  var count=document.getElementById('count');
  function apply(){
    var terms=input.value.toLowerCase().split(/\\s+/).filter(function(t){return t.length>0;});
    var shown=0;
    items.forEach(function(li){
      var hay=li.getAttribute('data-search')||'';
      var ok=terms.every(function(t){return hay.indexOf(t)>=0;});
      li.classList.toggle('hidden',!ok);
      var s=sections[li.getAttribute('data-qi')];
      if(s){s.classList.toggle('hidden',!ok);}
      if(ok){shown++;}
    });
    count.textContent=shown+' of '+items.length+' queries';
  }
  input.addEventListener('input',apply);
  document.addEventListener('keydown',function(e){
    if(e.key==='/'&&document.activeElement!==input){e.preventDefault();input.focus();input.select();}
    else if(e.key==='Escape'&&document.activeElement===input){input.value='';apply();}
  });
  items.forEach(function(li){
    li.addEventListener('click',function(){
      items.forEach(function(o){o.classList.remove('cur');});
      li.classList.add('cur');
    });
  });
  apply();
})();
"""


def csp(script: str) -> str:
    """The page's policy: no network, inline styles, `data:` images, and `script` by its sha256."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )
